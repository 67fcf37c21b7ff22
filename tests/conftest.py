"""Shared test settings.

``STABQ_TEST_THREADS`` (default 1) sets torch's and faiss's threads, in the tests and in the
processes they start, so that the training-outcome tests (marked ``outcome``) can be run on
another thread count too: ``make test-portable`` runs them on two threads and on other CPU
kernel paths.

``STABQ_DERANDOMIZE=1`` (``.ci/run`` sets it) makes every hypothesis test draw the same
examples on every run, so that a clean clone's verdict does not depend on the draw; a run
without it explores new examples each time, as development should.
"""

from __future__ import annotations

import os

import faiss
import pytest
import torch
from hypothesis import settings

THREADS = int(os.environ.get("STABQ_TEST_THREADS", "1"))
# The processes the tests start (`stabq` commands, fresh interpreters, torchrun ranks) run on
# as many threads as the tests themselves: left to torch's default of one a core, each of the
# two test processes' children would spin two OpenMP threads against the other's, which cost
# a 3-epoch `stabq train` over 4x its CPU time on this 2-core machine (measured under load).
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = str(THREADS)
if os.environ.get("STABQ_DERANDOMIZE") == "1":
    settings.register_profile("derandomized", derandomize=True, database=None)
    settings.load_profile("derandomized")


@pytest.fixture(scope="session", autouse=True)
def one_thread_each():
    """One torch and one faiss thread unless told otherwise: the models here are tiny, and
    on a shared 2-core machine idle OpenMP threads spinning against other processes cost
    10-30x in time."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(THREADS)
    faiss.omp_set_num_threads(THREADS)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


# How the two test processes share the work (`make test`: pytest-xdist `--dist loadgroup`).
# A file's tests run in one process, so that its module fixtures (a trained model, a
# reference run) are computed once; in the files below, the tests that need no such fixture
# go out one by one instead, so that no long file leaves one process working alone at the
# end. Work goes out in the order of LONGEST_FIRST (node-id prefixes, longest work first):
# the long runs start at once and the short files fill in around them.
SPLIT = {
    "test_accuracy.py", "test_bigdata.py", "test_cli_encoders.py", "test_cli_resume.py",
    "test_compile.py", "test_distributed.py", "test_distributed_resume.py",
    "test_docs_blocks.py", "test_explode.py", "test_gpu_check.py", "test_imports.py",
    "test_tensorboard.py", "test_transformers.py", "test_export.py", "test_trainer_overhead.py",
}  # fmt: skip
LONGEST_FIRST = [
    "tests/test_cli_encoders.py",
    "tests/test_tensorboard.py::test_the_how_to_commands_run_as_written",
    "tests/test_cli_resume.py",
    "tests/test_accuracy.py",
    "tests/test_gpu_check.py::test_the_check_runs_on_the_cpu_and_passes_exactly",
    "tests/test_bigdata.py::test_a_file_larger_than_the_memory_limit",
    "tests/test_compile.py",
    "tests/test_docs_blocks.py",
    "tests/test_explode.py",
    "tests/test_imports.py",
    "tests/test_distributed_resume.py",
    "tests/test_distributed.py",
    "tests/test_compare.py",
    "tests/test_docs_site.py",
    "tests/test_transformers.py",
    "tests/test_export.py",
    "tests/test_trainer_overhead.py",
]


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info is not None else ()
    return any(d.scope in ("module", "package", "class") for chain in defs for d in chain)


def _rank(item: pytest.Item) -> int:
    nodeid = item.nodeid
    return next(
        (i for i, prefix in enumerate(LONGEST_FIRST) if nodeid.startswith(prefix)),
        len(LONGEST_FIRST),
    )


def _join_group(item: pytest.Item, group: str, loadgroup: bool) -> None:
    """Mark ``item`` for the process that runs ``group``. pytest-xdist 3.8 sends a test to
    its group's process by the suffix ``@GROUP`` it appends to ``item._nodeid``, which
    pytest 9 no longer reads (the node id is ``item._id``): without the suffix each test
    was a group of its own, and a file's module fixtures (a trained model, a reference run)
    were computed again in each process that ran one of its tests."""
    item.add_marker(pytest.mark.xdist_group(group))
    node_id = getattr(item, "_id", None)
    if loadgroup and node_id is not None and "@" not in item.nodeid:
        item._id = type(node_id).parse(f"{item.nodeid}@{group}")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the groups into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: the order within a file is kept
    loadgroup = bool(getattr(config.option, "loadgroup", False))  # set in xdist's processes
    for item in items:
        file = item.nodeid.split("::", 1)[0]
        alone = file.rsplit("/", 1)[-1] in SPLIT and not _shares_a_module_fixture(item)
        _join_group(item, item.nodeid if alone else file, loadgroup)
