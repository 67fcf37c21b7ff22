"""TrainConfig(compile=True): the quantizer runs through torch.compile and computes the same.

The compiled FSQ is checked against eager on every CPU kernel path this machine
offers (``ATEN_CPU_CAPABILITY``), each in its own process (tests/compile_worker.py):
a kernel path changes both the eager ATen kernels and the code the inductor writes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import compile_worker
from stabq import BottleneckClassifier, TrainConfig, train
from stabq.data import load_data
from stabq.training import compiling
from stabq.training.compiling import inductor_cache_per_kernel_path

WORKER = Path(__file__).with_name("compile_worker.py")
# Measured on the default, avx2 and avx512 paths: quantized values and indices equal, every
# gradient within 1.5e-6 of eager relative to the step's largest gradient (the largest in
# a batch of identical rows, whose batch norm has no variance), buffers within 1.5e-7. A
# wrong gradient (a lost factor, a NaN) is off by order 1.
TOLERANCE = 1e-5


def kernel_paths() -> list[str]:
    """``default`` and every vector path the processor has (x86: avx2, avx512), whatever
    ``ATEN_CPU_CAPABILITY`` this process runs under."""
    cpu = torch.cpu
    if hasattr(cpu, "_is_avx2_supported") and cpu._is_avx2_supported():
        return ["default", "avx2"] + (["avx512"] if cpu._is_avx512_supported() else [])
    native = torch.backends.cpu.get_cpu_capability().lower()  # another architecture
    return ["default"] if native == "default" else ["default", native]


@pytest.fixture(scope="module")
def reports() -> dict[str, list[dict]]:
    """Every kernel path's worker, run side by side; its JSON lines."""
    procs = {}
    for path in kernel_paths():
        env = {**os.environ, "ATEN_CPU_CAPABILITY": path, "OMP_NUM_THREADS": "1"}
        procs[path] = subprocess.Popen(
            [sys.executable, str(WORKER)], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    found = {}
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        found[path] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return found


# Not marked `outcome` (the other tests here are): its workers set their own kernel path and
# one thread whatever this process runs under, so each of `make test-portable`'s three runs
# would repeat this one unchanged (with a cold inductor cache, about a minute of CPU a path).
@pytest.mark.parametrize("path", kernel_paths())
def test_compiled_fsq_forward_and_gradients_equal_eager_on_each_kernel_path(reports, path):
    cases = reports[path]
    assert len(cases) == 10, cases
    for case in cases:
        assert case["path"].lower() == path, case  # the process really took that path
        assert case["graphs"] == 1 and case["graph_breaks"] == 0, case  # compiled, whole
        assert case["finite"], case
        differences = case["relative"]
        assert differences.pop("indices") == 0, case
        assert max(differences.values()) <= TOLERANCE, case


@pytest.mark.outcome  # the verdict depends on how training ends
def test_the_comparison_sees_a_wrong_gradient():
    """The worker's measure is not blind: a gradient off by the FSQ slope counts as order 1."""
    _, fsq, x = next(compile_worker.cases())
    upstream = torch.randn(x.shape)
    want = compile_worker.step(fsq, x, upstream)
    fsq.zero_grad()
    got = compile_worker.step(fsq, x, upstream * 0.57)  # 1 / slope of the 8-level dims
    error = float((want["x.grad"] - got["x.grad"]).abs().max() / want["x.grad"].abs().max())
    assert error > 1000 * TOLERANCE


@pytest.mark.outcome  # the verdict depends on how training ends
def test_compile_option_trains_with_a_compiled_quantizer_that_matches_eager():
    data = load_data("synthetic:16", "train")
    torch.manual_seed(0)
    model = BottleneckClassifier(16, 10, quantizer="fsq", hidden=32, bottleneck_dim=16)
    assert model.quantizer._compiled_call_impl is None
    result = train(model, data, config=TrainConfig(epochs=3, compile=True, progress=False))
    assert model.quantizer._compiled_call_impl is not None  # the compiled call is in use
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.guard_events == []  # a clean run at the default rate: nothing to undo
    row = result.history[-1]
    # It learned, by a wide margin: measured over seeds 0-5 on 3 kernel paths, validation
    # loss 1.15-1.31 (untrained: ln 10 = 2.30) and accuracy 0.55-0.69 (chance: 0.1).
    assert math.isfinite(row["train_loss"]) and row["val_loss"] < 0.75 * math.log(10), row
    assert row["val_accuracy"] > 0.3, row
    z = compile_worker.clear_input(model.quantizer, 64, 1.0, seed=0)  # no rounding coin
    compiled = model.quantizer(z)
    eager = model.quantizer.forward(z)  # forward() bypasses the compiled __call__
    assert torch.equal(compiled.indices, eager.indices)
    torch.testing.assert_close(compiled.quantized, eager.quantized)


@pytest.mark.outcome  # the verdict depends on how training ends
def test_a_forced_kernel_path_gets_an_inductor_cache_of_its_own(monkeypatch, tmp_path):
    """torch 2.13's inductor cache key leaves ATEN_CPU_CAPABILITY out: code cached on the
    native path was served under avx2 (a NaN loss at step 17) and default (a C++ error)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the inductor's default lives under it
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert inductor_cache_per_kernel_path() is None  # the native path: left as it is
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    default = os.path.abspath(compiling._default_cache_dir())
    assert default.startswith(str(tmp_path))
    for path in ("default", "AVX2"):
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", path)
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default)  # as the inductor sets it
        want = os.path.join(default, f"aten-cpu-{path.lower()}")
        assert inductor_cache_per_kernel_path() == want == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # a child of the avx2 process
    assert inductor_cache_per_kernel_path() == os.path.join(default, "aten-cpu-default")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own
    assert inductor_cache_per_kernel_path() is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
