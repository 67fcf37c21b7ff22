"""Shared test settings."""

from __future__ import annotations

import faiss
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread_each():
    """One torch and one faiss thread: the models here are tiny, and on a shared 2-core
    machine idle OpenMP threads spinning against other processes cost 10-30x in time."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)
