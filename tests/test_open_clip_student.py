"""open_clip students in recipes, for real: a tiny randomly initialised open_clip ViT through `softalign train`
(recipe -> embeddings -> `softalign eval`), open_clip's preprocessing and tokenizer, CUSA's optimizer details."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from PIL import Image  # noqa: E402

from softalign.train.open_clip_student import OpenCLIPDualEncoder  # noqa: E402
from softalign.train.recipe import recipe_from_dict  # noqa: E402
from softalign.train.trainer import lr_factor, parameter_groups  # noqa: E402


def test_student_is_the_open_clip_model_with_cusas_heads(tiny_open_clip):
    torch.manual_seed(0)
    model = OpenCLIPDualEncoder(f"open_clip:{tiny_open_clip}", embed_dim=24, pretrained=False)
    assert model.feature_dims == (32, 32) and model.embed_dim == 24
    assert not model.clip.logit_scale.requires_grad  # the loss's temperature replaces CLIP's scale
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    _, _, preprocess_val = open_clip.create_model_and_transforms(tiny_open_clip, pretrained=None)
    x = model.image_transform(False)(pil)
    torch.testing.assert_close(x, preprocess_val(pil))  # open_clip's own evaluation transform
    captions = ["a red car", "two cats on a mat"]
    img, txt, img_f, txt_f = model(x[None].repeat(2, 1, 1, 1), captions, return_features=True)
    with torch.no_grad():
        torch.testing.assert_close(img_f, model.clip.encode_image(x[None].repeat(2, 1, 1, 1)).float())
        tokens = open_clip.get_tokenizer(tiny_open_clip)(captions)
        torch.testing.assert_close(txt_f, model.clip.encode_text(tokens).float())
    assert img.shape == txt.shape == (2, 24)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="open_clip has no architecture 'ViT-Nope'"):
        OpenCLIPDualEncoder("open_clip:ViT-Nope/openai", embed_dim=8)


def test_no_weight_decay_on_biases_and_1d_parameters_as_open_clip_and_cusa(tiny_open_clip):
    model = OpenCLIPDualEncoder(f"open_clip:{tiny_open_clip}", embed_dim=24, pretrained=False)
    groups = parameter_groups(model, 1e-5, 1e-4)
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(decay) + len(no_decay) == len(trainable) and not decay & no_decay
    # open_clip's main.py rule (its logit_scale is frozen here)
    exclude = {id(p) for n, p in trainable if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n}
    assert no_decay == exclude
    assert len(parameter_groups(model, 1e-5, 1e-4, decay_1d=True)) == 1


def test_cosine_per_epoch_equals_timms_scheduler_as_cusa_steps_it(tmp_path):
    from timm.scheduler import CosineLRScheduler

    r = recipe_from_dict(
        {
            "name": "x",
            "output_dir": str(tmp_path),
            "optim": {"lr": 1e-5, "min_lr": 1e-6, "schedule": "cosine", "schedule_interval": "epoch"},
        }
    )
    epochs, per_epoch = 5, 7
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=1e-6, warmup_t=0)  # CUSA's create_scheduler
    for epoch in range(epochs):
        sched.step(epoch)  # retrieval.py: lr_scheduler.step(epoch) at the start of every epoch
        for s in range(per_epoch):
            ours = 1e-5 * lr_factor(r, epoch * per_epoch + s, epochs * per_epoch, per_epoch)
            assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)


def test_softalign_train_then_eval_a_tiny_open_clip_model(tiny_open_clip, tmp_path):
    import yaml
    from safetensors.torch import load_file

    from softalign.cli import main

    recipe = {
        "name": "tiny_clip",
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "data": {"kind": "demo", "preload": True, "max_images": 24},
        "model": {
            "image_encoder": f"open_clip:{tiny_open_clip}",
            "text_encoder": "open_clip",
            "embed_dim": 32,
            "pretrained": False,
        },
        "teacher": {"cache_dir": str(tmp_path / "cache")},
        "loss": {"base": "infonce", "infonce_reduction": "cusa_mean", "alpha": 0.1, "beta": 0.5},
        "optim": {"lr": 1e-3, "weight_decay": 1e-4, "schedule": "cosine", "schedule_interval": "epoch"},
        "train": {"epochs": 2, "batch_size": 12, "eval_batch_size": 16, "progress": False},
    }
    path = tmp_path / "tiny_clip.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--cpu", "--no-progress"]) == 0
    run = tmp_path / "run"
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 2] and "test_rsum" in hist[-1]  # the epochs, then test once
    assert all(np.isfinite(h["train_loss"]) for h in hist[:2])
    assert hist[0]["lr"] == pytest.approx(5e-4)  # the lr the next step takes: epoch 2 of 2 on the cosine
    assert {"train_csa", "train_usa"} <= set(hist[0])
    emb = load_file(str(run / "embeddings_test.safetensors"))
    assert emb["image"].shape[1] == 32 and {"image_uni", "text_uni"} <= set(emb)
    assert main(["eval", "--embeddings", str(run / "embeddings_test.safetensors"), "--out", str(tmp_path / "ev")]) == 0
    report = json.loads(next((tmp_path / "ev").glob("*.json")).read_text())
    assert "rsum" in json.dumps(report)


def test_the_clip_recipes_fine_tune_openai_clip_through_open_clip():
    from pathlib import Path

    from softalign.train.open_clip_student import parse_open_clip_name
    from softalign.train.recipe import load_recipe

    paths = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*clip*.yaml"))
    assert len(paths) == 4
    for path in paths:
        for variant in (None, "csa_usa"):
            r = load_recipe(path, variant=variant)
            arch, tag = parse_open_clip_name(r.model.image_encoder)
            assert r.model.text_encoder == "open_clip" and tag == "openai"
            assert arch == ("ViT-L-14-336" if "vitl14" in path.name else "ViT-B-32")
            assert arch in open_clip.list_models() and "openai" in open_clip.list_pretrained_tags_by_model(arch)
            assert r.model.embed_dim == open_clip.get_model_config(arch)["embed_dim"]  # CUSA: embed_dim -> embed_dim
            assert (r.optim.schedule, r.optim.schedule_interval, r.optim.decay_1d) == ("cosine", "epoch", False)


def test_without_open_clip_the_cli_names_the_extra_in_one_line(tmp_path, monkeypatch, capsys):
    import sys

    import yaml

    from softalign.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "r",
                "output_dir": str(tmp_path / "run"),
                "data": {"kind": "demo"},
                "model": {"image_encoder": "open_clip:ViT-B-32/openai", "text_encoder": "open_clip"},
            }
        )
    )
    monkeypatch.setitem(sys.modules, "open_clip", None)
    assert main(["train", str(path), "--cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'softalign[clip]'" in err[0]
