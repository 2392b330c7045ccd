"""open_clip's own training script, ``open_clip_train.main``, run for real through
``python -m softalign.integrations.open_clip_train``: a tiny random ViT on a CSV of PNGs, two epochs with a
``--distill-model`` teacher; resumed from epoch 1 it reaches the uninterrupted run's state (the loss's included);
evaluation-only runs with and without a teacher; the checkpoint reloads into a plain open_clip model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("open_clip_train")

from softalign.integrations.open_clip import LOSS_KEY, SoftAlignClipLoss, load_checkpoint  # noqa: E402
from softalign.integrations.open_clip_train import main  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "pink", "brown"]


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """open_clip_train.main sets every logger to INFO and adds root handlers: put them back for the other tests."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    for name in logging.root.manager.loggerDict:
        logging.getLogger(name).setLevel(levels.get(name, logging.NOTSET))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_open_clip):
    from PIL import Image

    d = tmp_path_factory.mktemp("open_clip_train")
    rng = np.random.default_rng(0)
    rows = {"train": [], "val": []}
    for i, colour in enumerate(COLOURS + COLOURS[:4]):
        split = "train" if i < len(COLOURS) else "val"
        path = d / f"{split}{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)).save(path)
        rows[split].append(f"{path}\ta {colour} picture number {i}")
    for split, lines in rows.items():
        (d / f"{split}.csv").write_text("filepath\ttitle\n" + "\n".join(lines) + "\n")
    torch.manual_seed(5)
    torch.save(open_clip.create_model(tiny_open_clip, pretrained=None).state_dict(), d / "teacher.pt")
    return d


def _args(files, model, name, *extra):
    return [
        "--model",
        model,
        "--train-data",
        str(files / "train.csv"),
        "--val-data",
        str(files / "val.csv"),
        "--dataset-type",
        "csv",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--lr",
        "1e-2",
        "--warmup",
        "0",
        "--precision",
        "fp32",
        "--seed",
        "0",
        "--logs",
        str(files / "logs"),
        "--name",
        name,
        "--save-frequency",
        "1",
        # every crop is the whole 32 px image: an epoch's result does not depend on where the RNG stands
        "--aug-cfg",
        "scale=(1.0, 1.0)",
        "--distill-model",
        model,
        "--distill-pretrained",
        str(files / "teacher.pt"),
        *extra,
    ]


def _checkpoint(files, name, epoch):
    return torch.load(
        files / "logs" / name / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu", weights_only=True
    )


def test_train_resume_evaluate_and_reload_through_open_clips_own_main(files, tiny_open_clip):
    main(_args(files, tiny_open_clip, "whole", "--epochs", "2"))
    main(_args(files, tiny_open_clip, "first", "--epochs", "1"))
    first = files / "logs" / "first" / "checkpoints" / "epoch_1.pt"
    main(_args(files, tiny_open_clip, "resumed", "--epochs", "2", "--resume", str(first)))

    whole, resumed, start = (_checkpoint(files, n, e) for n, e in (("whole", 2), ("resumed", 2), ("first", 1)))
    loss_keys = sorted(k for k in whole["state_dict"] if k.startswith(LOSS_KEY + "."))
    temperatures = [k for k in loss_keys if k.endswith("log_value") or "temperature" in k]
    assert temperatures, loss_keys
    # the loss that trained is the one in main.py's optimizer: its temperatures moved and have Adam state
    fresh = SoftAlignClipLoss().state_dict()
    moved = [
        k
        for k in temperatures
        if k[len(LOSS_KEY) + 1 :] in fresh
        and fresh[k[len(LOSS_KEY) + 1 :]].is_floating_point()
        and not torch.equal(whole["state_dict"][k], fresh[k[len(LOSS_KEY) + 1 :]])
    ]
    assert moved, "the loss's learnable temperatures never moved"
    names = [n for n, p in _named_trainables(files, tiny_open_clip)]
    states = whole["optimizer"]["state"]
    loss_slots = [i for i, n in enumerate(names) if n.startswith(LOSS_KEY + ".")]
    assert loss_slots and all(i in states and float(states[i]["exp_avg"].abs().sum()) > 0 for i in loss_slots)
    # the calibrated soft-label temperature and the step counter are in the checkpoint and come back on resume
    extra = json.loads(bytes(whole["state_dict"][f"{LOSS_KEY}.soft._extra_state"].tolist()).decode())
    assert extra["calibration"] is not None and extra["steps"] == 2
    assert json.loads(bytes(start["state_dict"][f"{LOSS_KEY}.soft._extra_state"].tolist()).decode())["steps"] == 1
    # resumed from epoch 1, the run reaches the uninterrupted run's state: model, loss and optimizer. open_clip
    # reshuffles the batch after a resume (its own behaviour, also for ClipLoss): the loss is invariant to the order
    # up to float rounding, which Adam's first steps amplify on near-zero gradients to ~1e-4; epoch 2 itself moved
    # the weights by far more than that
    assert resumed["epoch"] == whole["epoch"] == 2
    for k, v in whole["state_dict"].items():
        tol = dict(rtol=1e-5, atol=1e-6) if k.startswith(LOSS_KEY) else dict(rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(resumed["state_dict"][k], v, **tol, msg=k)
    step = max(
        float((whole["state_dict"][k].float() - start["state_dict"][k].float()).abs().max())
        for k in whole["state_dict"]
        if not k.startswith(LOSS_KEY)
    )
    assert step > 5e-3
    for i, st in whole["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][i]["exp_avg"], st["exp_avg"], rtol=1e-3, atol=1e-4)

    # evaluation only (no --train-data): with and without a teacher
    path = files / "logs" / "whole" / "checkpoints" / "epoch_2.pt"
    for name, teacher in (
        ("eval", []),
        ("eval_teacher", ["--distill-model", tiny_open_clip, "--distill-pretrained", str(files / "teacher.pt")]),
    ):
        main(
            [
                "--model",
                tiny_open_clip,
                "--val-data",
                str(files / "val.csv"),
                "--dataset-type",
                "csv",
                "--csv-img-key",
                "filepath",
                "--csv-caption-key",
                "title",
                "--batch-size",
                "4",
                "--workers",
                "0",
                "--precision",
                "fp32",
                "--logs",
                str(files / "logs"),
                "--name",
                name,
                "--resume",
                str(path),
                *teacher,
            ]
        )
        results = [
            json.loads(x) for x in (files / "logs" / name / "checkpoints" / "results.jsonl").read_text().splitlines()
        ]
        assert "image_to_text_R@1" in results[-1]

    # reload into a plain open_clip model (the model strictly, the loss state apart)
    model = open_clip.create_model(tiny_open_clip, pretrained=None)
    loss = SoftAlignClipLoss()
    assert load_checkpoint(model, str(path), loss) == 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, whole["state_dict"][k])
    assert loss.soft.calibration == extra["calibration"]


def _named_trainables(files, model_name):
    """main.py's optimizer groups, in its order: (1-D, norms, biases, logit_scale) then the rest."""
    model = open_clip.create_model(model_name, pretrained=None)
    model.add_module(LOSS_KEY, SoftAlignClipLoss())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exclude = [(n, p) for n, p in named if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    return exclude + [(n, p) for n, p in named if all(n != m for m, _ in exclude)]


def test_training_without_a_teacher_and_unknown_softalign_options_are_refused(files, tiny_open_clip):
    args = [a for a in _args(files, tiny_open_clip, "no_teacher", "--epochs", "1")]
    cut = args.index("--distill-model")
    with pytest.raises(ValueError, match="needs teacher features or a cache: run with --distill-model"):
        main(args[:cut] + args[cut + 4 :])
    with pytest.raises(SystemExit, match=r"unknown softalign option\(s\) \['--softalign-alhpa'\]"):
        main(["--softalign-alhpa", "3"] + args)
