"""Shared test settings.

``STABQ_TEST_THREADS`` (default 1) sets torch's and faiss's threads, so that the
training-outcome tests (marked ``outcome``) can be run on another thread count
too: ``make test-portable`` runs them on two threads and on other CPU kernel paths.

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
