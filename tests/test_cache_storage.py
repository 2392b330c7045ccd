"""On-disk primitives: streamed safetensors, memory-mapped reads, atomic writes; RGB conversion of inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from softalign.teachers import storage
from softalign.teachers.preprocess import to_rgb


def test_streamed_file_reads_back_with_safetensors_and_mmap(tmp_path):
    from safetensors import safe_open

    a = torch.randn(10, 3).half()
    b = torch.arange(7, dtype=torch.int64)
    storage.write_safetensors_streamed(
        tmp_path / "x.safetensors",
        {"a": (torch.float16, (10, 3)), "b": (torch.int64, (7,))},
        {"a": lambda: iter([a[:4], a[4:9], a[9:]]), "b": lambda: iter([b])},
        metadata={"k": "v"},
    )
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("a"), a) and torch.equal(f.get_tensor("b"), b)
        assert f.metadata() == {"k": "v"}
    m = storage.mmap_safetensors(tmp_path / "x.safetensors")
    assert torch.equal(m["a"], a) and torch.equal(m["b"], b)


def test_short_stream_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="'a' received 24 bytes, expected 60"):
        storage.write_safetensors_streamed(
            tmp_path / "x.safetensors", {"a": (torch.float16, (10, 3))}, {"a": lambda: iter([torch.zeros(4, 3)])}
        )
    with pytest.raises(ValueError, match=r"rows of shape \(3,\)"):
        storage.write_safetensors_streamed(
            tmp_path / "x.safetensors", {"a": (torch.float16, (10, 3))}, {"a": lambda: iter([torch.zeros(10, 4)])}
        )
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    p = tmp_path / "m.json"
    storage.atomic_write_json(p, {"v": 1})

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        storage.atomic_write(p, boom)
    assert p.read_text().strip().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.json"]


def test_truncated_safetensors_is_refused(tmp_path):
    storage.atomic_save_tensors(tmp_path / "t.safetensors", {"embeddings": torch.ones(5, 4)})
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-8])
    with pytest.raises(ValueError, match="is not a safetensors file .*not fully covered"):
        storage.mmap_safetensors(tmp_path / "t.safetensors")
    (tmp_path / "t.safetensors").write_bytes(raw[:5])
    with pytest.raises(ValueError, match="not a safetensors file"):
        storage.mmap_safetensors(tmp_path / "t.safetensors")


def test_dtype_names():
    assert storage.torch_dtype("fp16") is torch.float16 and storage.torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="'int8' is not supported"):
        storage.torch_dtype("int8")


def test_transparent_pixels_become_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]
    pal = Image.fromarray(rgba, "RGBA").convert("P")
    pal.info["transparency"] = pal.getpixel((1, 1))
    assert np.asarray(to_rgb(pal))[1, 1].tolist() == [255, 255, 255]
