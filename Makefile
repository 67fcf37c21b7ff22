# `make demo` and `make test` work on a fresh machine: they create .venv,
# install the CPU build of torch first (so no CUDA build is pulled in), then
# the project with its range `torch>=2.2`, which that build already satisfies.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# the docs extra (mkdocs and its plugins), installed by `make docs` only
DOCS_STAMP := $(VENV)/.installed-docs
# test processes (pytest-xdist), one a core; each runs torch on one thread; a file's tests
# share a process unless tests/conftest.py sends them out one by one, longest first
WORKERS ?= 2
XDIST  := -n $(WORKERS) --dist loadgroup --no-loadscope-reorder

.PHONY: demo test test-portable lint format bench docs clean

$(STAMP): pyproject.toml
	@echo "setting up $(VENV): the CPU build of torch, then stabq and its extras (about a minute)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev,lightning,tensorboard,torchmetrics,transformers,onnx]'
	touch $(STAMP)

# the quick preset: 6 methods x 2 seeds on mnist1d, each run until it stops improving,
# about 2 minutes on 2 cores;
# `stabq compare --out runs/compare` runs the full default comparison (14 methods)
demo: $(STAMP)
	$(BIN)/stabq compare --data mnist1d --preset quick --out runs/compare

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(XDIST)

# The tests whose verdict depends on how a training run ends (marker `outcome`), again on
# other CPU kernel paths (ATen and the inductor both follow ATEN_CPU_CAPABILITY) and on two
# threads instead of one: a verdict that holds on this processor must hold on any.
test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -m outcome -p no:cacheprovider $(XDIST)
	ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -q -m outcome -p no:cacheprovider $(XDIST)
	# one process: two of two threads each would oversubscribe the cores
	STABQ_TEST_THREADS=2 $(BIN)/python -m pytest -q -m outcome -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/quantizers.py
	$(BIN)/python benchmarks/presets.py

$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

# the site in site/: strict, so a broken link or anchor, or a docstring the API reference
# cannot read, fails; the API page comes from the docstrings, the CLI page from the typer
# app (docs/hooks/cli.py)
docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build dist site .pytest_cache .hypothesis .ruff_cache
