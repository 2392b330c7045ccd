"""The reference trainer chooses on validation and scores test once: data.validation, eval_every on it,
train.keep_best, the selected checkpoint's test metrics, a resume that keeps the selection, and the trackers of
``softalign train --report-to``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_train_trainer import _train, tiny_recipe


def _counting_evaluations(monkeypatch):
    import softalign.train.trainer as T

    seen = []
    real = T.evaluate_student

    def spy(model, loss_fn, data, *a, **k):
        seen.append(data.split)
        return real(model, loss_fn, data, *a, **k)

    monkeypatch.setattr(T, "evaluate_student", spy)
    return seen


def test_validation_chooses_the_checkpoint_and_test_is_scored_once_on_it(tmp_path, data, accelerator, monkeypatch):
    from safetensors.torch import load_file

    from softalign.train.model_factory import build_model
    from softalign.train.trainer import encode_split, evaluate_embeddings, image_transform

    seen = _counting_evaluations(monkeypatch)
    recipe = tiny_recipe(
        tmp_path, data={"validation": 0.25}, train={"epochs": 4, "keep_best": "rsum"}, optim={"lr": 0.05}
    )
    res = _train(recipe, data, accelerator)
    assert seen == ["validation"] * 4 + ["test"]  # validation every epoch, test once, at the end
    hist = res["history"]
    assert all("val_rsum" in h and not any(k.startswith("test_") for k in h) for h in hist)
    best_epoch = 1 + int(np.argmax([h["val_rsum"] for h in hist]))
    sel = res["selection"]
    assert sel["epoch"] == best_epoch and sel["metric"] == "val_rsum"
    assert sel["value"] == max(h["val_rsum"] for h in hist) and "keep_best" in sel["why"]
    assert json.loads((tmp_path / "results.json").read_text())["selection"] == sel
    # the test metrics are those of the best epoch's weights, not of the last epoch's
    model = build_model(
        recipe.model,
        [],
        vocab_words=json.loads(
            (
                tmp_path
                / "checkpoints"
                / (tmp_path / "checkpoints" / "latest").read_text().strip()
                / "train_state.json"
            ).read_text()
        )["vocab"],
    )
    model.load_state_dict(load_file(str(tmp_path / "best" / "model.safetensors")))
    img, txt = encode_split(model, data[1], image_transform(recipe, False), 16, "cpu")
    assert res["metrics"]["rsum"] == pytest.approx(evaluate_embeddings(img, txt, data[1])["rsum"])
    saved = load_file(str(tmp_path / "embeddings_test.safetensors"))
    torch.testing.assert_close(saved["image"], img)
    # the validation images were cut from training with the recipe's seed: 3 of 12 images, none trained on
    assert json.loads((tmp_path / "best" / "best.json").read_text())["epoch"] == best_epoch


def test_a_resumed_run_keeps_its_best_checkpoint_and_selects_as_an_uninterrupted_one(tmp_path, data, accelerator):
    recipe = dict(data={"validation": 0.25}, train={"epochs": 4, "keep_best": "rsum"}, optim={"lr": 0.05})
    whole = _train(tiny_recipe(tmp_path / "whole", **recipe), data, accelerator)
    part = dict(recipe, train={"epochs": 2, "keep_best": "rsum"})
    _train(tiny_recipe(tmp_path / "split", **part), data, accelerator)
    resumed = _train(tiny_recipe(tmp_path / "split", **recipe), data, accelerator)  # epochs 3-4 after a resume
    assert [h["val_rsum"] for h in resumed["history"]] == pytest.approx([h["val_rsum"] for h in whole["history"]])
    assert {k: v for k, v in resumed["selection"].items() if k != "checkpoint"} == {
        k: v for k, v in whole["selection"].items() if k != "checkpoint"
    }
    assert resumed["metrics"] == pytest.approx(whole["metrics"])


def test_selection_settings_are_checked(tmp_path):
    from softalign.train.recipe import RecipeError

    with pytest.raises(RecipeError, match="train.keep_best: 'rsum' is chosen on validation: set data.validation"):
        tiny_recipe(tmp_path, train={"keep_best": "rsum"})
    with pytest.raises(RecipeError, match=r"data.validation: 'test' is the test split"):
        tiny_recipe(tmp_path, data={"kind": "karpathy", "path": "x.json", "image_root": "x", "validation": "test"})
    with pytest.raises(RecipeError, match=r"data.validation: a fraction of the training images must lie in \(0, 1\)"):
        tiny_recipe(tmp_path, data={"validation": 1.5})


def test_an_unknown_keep_best_metric_names_the_metrics_there_are(tmp_path, data, accelerator):
    with pytest.raises(
        ValueError,
        match=r"train.keep_best: 'r_sum' is not a metric of the validation split; it "
        r"gives .*rsum",
    ):
        _train(
            tiny_recipe(tmp_path, data={"validation": 0.25}, train={"epochs": 1, "keep_best": "r_sum"}),
            data,
            accelerator,
        )


def _precomp_recipe(tmp_path, **train):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)).astype(np.float32)
    words = ["alpha", "beta", "gamma", "delta"]
    for split, n in (("train", 12), ("test", 4)):
        kinds = np.arange(n) % 4
        np.save(
            tmp_path / f"{split}_ims.npy",
            (centers[kinds][:, None, :] + 0.1 * rng.normal(size=(n, 3, 8))).astype(np.float32),
        )
        (tmp_path / f"{split}_caps.txt").write_text(
            "".join(f"a {words[k]} thing number {j}\n" for k in kinds for j in range(5))
        )
    import yaml

    recipe = {
        "name": "tb",
        "output_dir": str(tmp_path / "runs"),
        "data": {"kind": "precomp", "path": str(tmp_path), "validation": 0.25},
        "model": {"image_encoder": "precomp", "text_encoder": "bow", "embed_dim": 16},
        "loss": {"base": "vsepp", "alpha": 0.0, "beta": 0.0},
        "optim": {"lr": 0.01},
        "train": {"epochs": 2, "batch_size": 8, "progress": False, **train},
        "variants": {"base": {}},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "r.yaml"


def test_report_to_tensorboard_writes_event_files_of_every_metric(tmp_path, fresh_accelerate_state):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from softalign.cli import main

    path = _precomp_recipe(tmp_path)
    assert main(["train", str(path), "--variant", "base", "--report-to", "tensorboard"]) == 0
    run = tmp_path / "runs" / "tb-base"  # one run per variant, named after it, under the recipe's output_dir
    assert list(run.glob("events.out.tfevents.*"))  # (accelerate puts the recipe as hparams in a subfolder)
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_rsum", "test_rsum", "epoch"} <= tags
    assert [e.step for e in events.Scalars("val_rsum")] == [5, 10]  # 9 training images x 5 captions // batch 8
    results = json.loads((tmp_path / "runs" / "base" / "results.json").read_text())
    assert events.Scalars("test_rsum")[-1].value == pytest.approx(results["metrics"]["rsum"])
