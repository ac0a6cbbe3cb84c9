import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _on_the_cpu(request, monkeypatch):
    """The suite pins exact CPU arithmetic, so on a GPU machine the code under test is
    shown no GPU; `tests/test_cuda_paths.py` is the one module that runs on it."""
    if request.node.module.__name__.split(".")[-1] != "test_cuda_paths":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield
