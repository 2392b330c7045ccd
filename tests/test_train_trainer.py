"""Reference trainer on tiny synthetic data: loss goes down, +CUSA with a real TeacherCache (stub teachers),
checkpoint round-trip, resume continues at the right epoch, embeddings readable by `softalign eval`."""
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from softalign.data import RetrievalData
from softalign.train.recipe import recipe_from_dict

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "bar", "dot")


def _image(colour, shape):
    im = Image.new("RGB", (8, 8), (255, 255, 255))
    box = {"square": (1, 1, 7, 7), "bar": (0, 3, 8, 5), "dot": (3, 3, 5, 5)}[shape]
    im.paste(COLOURS[colour], box)
    return im


def tiny_data(split="train"):
    images, captions, c2i, labels = [], [], [], []
    for ci, colour in enumerate(COLOURS):
        for shape in SHAPES:
            i = len(images)
            images.append(_image(colour, shape))
            for cap in (f"a {colour} {shape}", f"{shape} in {colour}", f"the {colour} one, a {shape}"):
                captions.append(cap)
                c2i.append(i)
            labels.append(ci)
    return RetrievalData(captions, images, c2i, image_labels=labels, name="tiny", split=split)


def tiny_recipe(out, **over):
    values = {"name": "tiny", "seed": 0, "output_dir": str(out),
              "data": {"kind": "demo", "image_size": 8, "preload": True},
              "model": {"embed_dim": 16, "word_dim": 8, "cnn_width": 4},
              "loss": {"base": "infonce"},
              "optim": {"lr": 0.01, "schedule": "constant"},
              "train": {"epochs": 2, "batch_size": 12, "eval_batch_size": 16, "progress": False}}
    for k, v in over.items():
        values[k] = {**values.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe_from_dict(values)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def data():
    return tiny_data("train"), tiny_data("test")


def _train(recipe, data, accelerator, **kw):
    from softalign.train.trainer import train

    return train(recipe, accelerator=accelerator, train_data=data[0], test_data=data[1], log=lambda m: None, **kw)


def test_two_epoch_run_loss_goes_down_and_writes_outputs(tmp_path, data, accelerator):
    res = _train(tiny_recipe(tmp_path), data, accelerator)
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and "test_rsum" in lines[-1]
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["rsum"] == res["metrics"]["rsum"]
    assert {"i2t_r1", "t2i_r10", "rsum", "i2i_precision_at_1", "t2t_map_at_r"} <= set(res["metrics"])
    assert not list(tmp_path.rglob(".tmp-*"))


def test_saved_embeddings_match_the_model_and_the_eval_cli_reads_them(tmp_path, data, accelerator):
    from safetensors.torch import load_file

    from softalign.cli import main
    from softalign.train.models import build_model
    from softalign.train.trainer import encode_split, image_transform, load_checkpoint

    recipe = tiny_recipe(tmp_path / "run")
    _train(recipe, data, accelerator)
    emb = load_file(str(tmp_path / "run" / "embeddings_test.safetensors"))
    test = data[1]
    assert emb["image"].shape == (test.num_images, 16) and emb["text"].shape == (test.num_captions, 16)
    assert emb["caption_to_image"].tolist() == test.caption_to_image.tolist()
    assert emb["image_labels"].tolist() == test.image_labels.tolist()
    assert emb["text_labels"].tolist() == test.text_labels.tolist()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    model = build_model(recipe.model, [], vocab_words=ckpt["vocab"])
    model.load_state_dict(ckpt["model"])
    img, txt = encode_split(model, test, image_transform(recipe, False), 7, "cpu")
    torch.testing.assert_close(img, emb["image"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, emb["text"], atol=1e-5, rtol=1e-5)
    assert main(["eval", "--embeddings", str(tmp_path / "run" / "embeddings_test.safetensors"),
                 "--out", str(tmp_path / "eval")]) == 0


class StubTextTeacher:
    """Bag of hashed words: captions sharing words are similar (a real TeacherCache is built from it)."""
    name, dim = "stub-text", 32

    def encode(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, sum(map(ord, w)) % self.dim] += 1.0
        return torch.nn.functional.normalize(out, dim=1)


class StubImageTeacher:
    """Mean colour of the image."""
    name, dim = "stub-image", 3

    def encode(self, images):
        return torch.nn.functional.normalize(
            torch.stack([torch.tensor(np.asarray(im.convert("RGB"), np.float32).mean((0, 1))) for im in images]), dim=1)


def test_cusa_run_uses_the_teacher_cache(tmp_path, data, accelerator):
    from softalign.teachers import TeacherCache

    train_data = data[0]
    cache = TeacherCache.build(tmp_path / "cache", train_data.captions, train_data.images, train_data.caption_to_image,
                               text_teacher=StubTextTeacher(), image_teacher=StubImageTeacher(), progress=False)
    recipe = tiny_recipe(tmp_path / "run", loss={"base": "infonce", "alpha": 0.1, "beta": 0.5},
                         teacher={"cache_dir": str(tmp_path / "cache")})
    res = _train(recipe, data, accelerator, cache=cache)
    first = res["history"][0]
    assert first["train_csa"] > 0 and first["train_usa"] > 0
    assert first["train_loss"] == pytest.approx(first["train_base"] + 0.1 * first["train_csa"]
                                                + 0.5 * first["train_usa"], rel=1e-4)
    # the trainer also finds and validates the cache on its own (no cache passed in)
    res2 = _train(tiny_recipe(tmp_path / "run2", loss={"base": "infonce", "alpha": 0.1, "beta": 0.5},
                              teacher={"cache_dir": str(tmp_path / "cache")}), data, accelerator)
    assert res2["history"][0]["train_csa"] == pytest.approx(first["train_csa"], rel=1e-4)


def test_teacher_cache_of_other_data_is_refused(tmp_path, data, accelerator):
    from softalign.teachers import TeacherCache
    from softalign.train.trainer import get_teacher_cache

    other = data[0].select_images(range(6))
    TeacherCache.build(tmp_path / "cache", other.captions, other.images, other.caption_to_image,
                       text_teacher=StubTextTeacher(), image_teacher=StubImageTeacher(), progress=False)
    recipe = tiny_recipe(tmp_path / "run", loss={"alpha": 0.1}, teacher={"cache_dir": str(tmp_path / "cache")})
    with pytest.raises(ValueError, match="holds 18 captions / 6 images but the training split has 36 / 12"):
        get_teacher_cache(recipe, data[0])


def test_resume_continues_at_the_next_epoch_and_matches_an_uninterrupted_run(tmp_path, data, accelerator):
    from softalign.train.trainer import load_checkpoint

    full = _train(tiny_recipe(tmp_path / "full", train={"epochs": 3}), data, accelerator)
    part = _train(tiny_recipe(tmp_path / "resumed", train={"epochs": 2}), data, accelerator)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["epoch"] == 2
    msgs = []
    from softalign.train.trainer import train

    resumed = train(tiny_recipe(tmp_path / "resumed", train={"epochs": 3}), accelerator=accelerator,
                    train_data=data[0], test_data=data[1], log=msgs.append)
    assert any("after epoch 2" in m for m in msgs)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == part["history"][:2] or \
        [h["train_loss"] for h in resumed["history"][:2]] == [h["train_loss"] for h in part["history"]]
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)
    assert resumed["history"][2]["train_loss"] == pytest.approx(full["history"][2]["train_loss"], rel=1e-4)


def test_resume_refuses_a_different_model(tmp_path, data, accelerator):
    _train(tiny_recipe(tmp_path, train={"epochs": 1}), data, accelerator)
    with pytest.raises(ValueError, match="cannot resume from .*last.pt"):
        _train(tiny_recipe(tmp_path, train={"epochs": 2}, model={"embed_dim": 8}), data, accelerator)


def test_checkpoint_round_trip(tmp_path):
    from softalign.losses import SoftAlignLoss
    from softalign.train.models import build_model, vocab_of
    from softalign.train.trainer import load_checkpoint, save_checkpoint

    recipe = tiny_recipe(tmp_path)
    model = build_model(recipe.model, ["a red square", "blue dot"])
    loss = SoftAlignLoss(embed_dim=16, base="infonce", alpha=0.1, beta=0.5)
    opt = torch.optim.AdamW(list(model.parameters()) + list(loss.parameters()))
    save_checkpoint(tmp_path / "c" / "last.pt", model, loss, opt, 4, 40, recipe, vocab_of(model))
    ck = load_checkpoint(tmp_path / "c" / "last.pt")
    assert (ck["epoch"], ck["step"], ck["vocab"][:2]) == (4, 40, ["<pad>", "<unk>"])
    assert set(ck["vocab"]) == {"<pad>", "<unk>", "a", "red", "square", "blue", "dot"}
    model2 = build_model(recipe.model, [], vocab_words=ck["vocab"])
    model2.load_state_dict(ck["model"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_lr_schedules(tmp_path):
    from softalign.train.trainer import lr_factor

    cos = tiny_recipe(tmp_path, optim={"schedule": "cosine", "lr": 0.1, "min_lr": 0.01})
    assert lr_factor(cos, 0, 100, 10) == pytest.approx(1.0)
    assert lr_factor(cos, 50, 100, 10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cos, 100, 100, 10) == pytest.approx(0.1)
    step = tiny_recipe(tmp_path, optim={"schedule": "step", "lr_decay_epoch": 15, "lr_decay_factor": 0.1})
    assert lr_factor(step, 149, 300, 10) == 1.0 and lr_factor(step, 150, 300, 10) == pytest.approx(0.1)


def test_timm_encoder_is_imported_lazily(monkeypatch):
    from softalign.train.models import build_model

    class FakeBackbone(torch.nn.Module):
        num_features = 6

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 6)

        def forward(self, x):
            return self.lin(x.mean((2, 3)))

    calls = {}

    def create_model(name, pretrained, num_classes):
        calls.update(name=name, pretrained=pretrained, num_classes=num_classes)
        return FakeBackbone()

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    cfg = tiny_recipe("x", model={"image_encoder": "timm:fake_net", "pretrained": False}).model
    model = build_model(cfg, ["a b"])
    assert calls == {"name": "fake_net", "pretrained": False, "num_classes": 0}
    img, txt = model(torch.randn(2, 3, 8, 8), ["a", "b"])
    assert img.shape == txt.shape == (2, 16)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(2))

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ImportError, match=r"pip install softalign\[timm\]"):
        build_model(cfg, ["a b"])


def test_precomp_encoder_pools_regions():
    from softalign.train.models import PrecompImageEncoder

    enc = PrecompImageEncoder(4, 3, "mean")
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(enc(x), (x @ enc.fc.weight.T + enc.fc.bias).mean(1))
    with pytest.raises(ValueError, match="features have dim 5, the encoder expects 4"):
        enc(torch.randn(2, 5))


def test_precomputed_features_train_end_to_end(tmp_path, accelerator):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)).astype(np.float32)
    for split, n in (("train", 12), ("test", 4)):
        kinds = np.arange(n) % 4
        feats = centers[kinds][:, None, :] + 0.1 * rng.normal(size=(n, 3, 8)).astype(np.float32)
        np.save(tmp_path / f"{split}_ims.npy", feats.astype(np.float32))
        words = ["alpha", "beta", "gamma", "delta"]
        (tmp_path / f"{split}_caps.txt").write_text(
            "".join(f"a {words[k]} thing number {j}\n" for k in kinds for j in range(5)))
    recipe = tiny_recipe(tmp_path / "run", data={"kind": "precomp", "path": str(tmp_path), "preload": False},
                         model={"image_encoder": "precomp", "text_encoder": "bow"},
                         loss={"base": "vsepp"}, train={"epochs": 2})
    from softalign.train.trainer import load_splits, train

    tr, te = load_splits(recipe)
    assert isinstance(tr.images, np.ndarray) and tr.num_captions == 60
    res = train(recipe, accelerator=accelerator, log=lambda m: None)
    assert res["history"][1]["train_loss"] < res["history"][0]["train_loss"]
    assert {"i2t_r1", "rsum"} <= set(res["metrics"]) and "i2i_map_at_r" not in res["metrics"]
    with pytest.raises(FileNotFoundError, match="with precomputed features the image teacher needs the original"):
        from softalign.train.trainer import get_teacher_cache

        get_teacher_cache(tiny_recipe(tmp_path / "run2", data={"kind": "precomp", "path": str(tmp_path)},
                                      model={"image_encoder": "precomp"}, loss={"alpha": 0.1}), tr)
