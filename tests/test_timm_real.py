"""timm for real: the ``timm:<name>`` image teacher (local weights, the model's own data config) and the timm
student of the recipes, with small randomly initialised timm test models (no download)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402

from softalign.teachers import resolve_image_teacher  # noqa: E402
from softalign.teachers.image import TimmImageTeacher  # noqa: E402


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """A randomly initialised timm ``test_vit`` (with its classifier) saved to a local safetensors file."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    path = tmp_path_factory.mktemp("timm") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def _photo(seed: int, size=(90, 70)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_timm_teacher_loads_local_weights_and_matches_the_model(vit_weights):
    path, reference = vit_weights
    t = resolve_image_teacher("timm:test_vit", device="cpu", weights=path)
    assert isinstance(t, TimmImageTeacher) and t.name == "timm:test_vit"
    assert t.dim == reference.num_features == 64 and t.config["weights"] == str(path)
    images = [_photo(1), _photo(2, (50, 120))]
    got = t.encode(images)
    # independently: the saved model's pooled pre-logits features on timm's own evaluation transform
    cfg = timm.data.resolve_model_data_config(reference)
    tf = timm.data.create_transform(**cfg, is_training=False)
    reference.eval()
    with torch.no_grad():
        x = torch.stack([tf(im) for im in images])
        want = reference.forward_head(reference.forward_features(x), pre_logits=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[0], got[1])


def test_timm_teacher_preprocessing_equals_timms_own_transform(vit_weights):
    path, reference = vit_weights
    t = resolve_image_teacher("timm:test_vit", device="cpu", weights=path)
    cfg = timm.data.resolve_model_data_config(reference)
    pp = t.config["preprocessing"]
    assert pp["size"] == [160, 160] and pp["interpolation"] == cfg["interpolation"] == "bicubic"
    tf = timm.data.create_transform(**cfg, is_training=False)
    for im in (_photo(3, (200, 100)), _photo(4, (161, 300)), _photo(6, (50, 120)), _photo(7, (33, 33))):
        ours, theirs = t.preprocessing(im), tf(im)
        assert ours.shape == theirs.shape == (3, 160, 160)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # the same PIL resize and crop offsets


def test_timm_hub_name_without_weights_asks_for_the_pretrained_model(monkeypatch):
    calls = []
    real = timm.create_model

    def spy(name, **kw):  # record what the teacher asks timm for, then build it without a download
        calls.append(dict(name=name, **kw))
        return real(name, **{**kw, "pretrained": False})

    monkeypatch.setattr(timm, "create_model", spy)
    t = resolve_image_teacher("timm:test_resnet", device="cpu")
    assert calls == [dict(name="test_resnet", pretrained=True, num_classes=0)]
    assert t.encode([_photo(5)]).shape == (1, t.dim)


def test_timm_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"pip install softalign\[timm\]"):
        resolve_image_teacher("timm:resnet50")


def test_timm_cache_build_records_the_teacher(vit_weights, tmp_path):
    from softalign.teachers import TeacherCache

    path, _ = vit_weights
    paths = []
    for i in range(4):
        _photo(10 + i).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))

    class Words:  # a tiny text teacher: bag of letters
        name, dim = "letters", 26

        def encode(self, texts):
            out = torch.zeros(len(texts), 26)
            for r, s in enumerate(texts):
                for ch in s:
                    if ch.isalpha():
                        out[r, ord(ch.lower()) - 97] += 1
            return out

    cache = TeacherCache.build(
        tmp_path / "cache",
        captions=["a red", "a blue", "green", "grey"],
        images=paths,
        caption_to_image=[0, 1, 2, 3],
        text_teacher=Words(),
        image_teacher="timm:test_vit",
        image_weights=path,
        device="cpu",
        progress=False,
    )
    assert cache.manifest["image_teacher"]["name"] == "timm:test_vit"
    sims = cache.similarities(torch.arange(4))
    assert sims.image.shape == (4, 4)
    torch.testing.assert_close(torch.diagonal(sims.image), torch.ones(4), atol=2e-3, rtol=0)


# ------------------------------------------------------------------------------------------------ students
def test_timm_student_is_the_real_backbone_and_names_the_extra_without_timm(monkeypatch):
    from softalign.train.model_factory import build_model
    from softalign.train.models import TimmImageEncoder
    from softalign.train.recipe import recipe_from_dict

    cfg = recipe_from_dict(
        {
            "name": "x",
            "output_dir": "x",
            "model": {"image_encoder": "timm:test_resnet", "pretrained": False, "embed_dim": 16, "word_dim": 8},
        }
    ).model
    model = build_model(cfg, ["a b"])
    assert isinstance(model.image_encoder, TimmImageEncoder)
    backbone = model.image_encoder.backbone
    assert type(backbone).__module__.startswith("timm.") and backbone.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    img, txt = model(x, ["a", "b"])
    assert img.shape == txt.shape == (2, 16)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(2))
    feats = model.image_encoder(x)
    torch.testing.assert_close(feats, model.image_encoder.proj(backbone(x)))  # backbone -> projection

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ImportError, match=r"pip install softalign\[timm\]"):
        build_model(cfg, ["a b"])


def test_timm_student_trains_through_the_trainer(tmp_path):
    from softalign.train.recipe import recipe_from_dict
    from softalign.train.trainer import train

    recipe = recipe_from_dict(
        {
            "name": "timm_tiny",
            "seed": 0,
            "output_dir": str(tmp_path),
            "data": {"kind": "demo", "image_size": 32, "preload": True, "max_images": 24},
            "model": {"image_encoder": "timm:test_resnet", "pretrained": False, "embed_dim": 16, "word_dim": 8},
            "loss": {"base": "infonce"},
            "optim": {"lr": 0.003, "schedule": "constant"},
            "train": {"epochs": 2, "batch_size": 12, "eval_batch_size": 16, "progress": False},
        }
    )
    res = train(recipe, log=lambda m: None)
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and np.isfinite(hist[-1]["train_loss"])
    assert (tmp_path / "embeddings_test.safetensors").is_file() and "rsum" in res["metrics"]
