import os

import pytest
import torch

os.environ.setdefault("CLX_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def tmp_results(tmp_path, monkeypatch):
    monkeypatch.setenv("CLX_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"
