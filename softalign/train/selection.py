"""Which checkpoint the test split scores: the best epoch on the validation split by ``train.keep_best``, or the
last one. Settings are chosen on validation; the test split is scored once, at the end, on the chosen weights.

The best weights live in ``OUTPUT_DIR/best/``: ``model.safetensors``, ``loss.safetensors`` (USA heads,
temperatures, calibration) and ``best.json`` (epoch, metric, value), written into a fresh folder that then replaces
the old one. The run's ``train_state.json`` records the same epoch, so a resumed run keeps its best so far.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from softalign.io import atomic_save_tensors, atomic_write_json

#: metrics where lower is better (ranks); every other metric is better when higher
LOWER_IS_BETTER = ("medr", "meanr")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


class BestCheckpoint:
    """Keeps the weights of the best validation epoch by ``metric`` (``None``: off) in ``folder``; ``progress``
    (a :class:`~softalign.train.checkpoint.TrainProgress`) carries the best so far through checkpoints."""

    def __init__(self, folder: str | Path, metric: str | None, progress):
        self.folder, self.metric, self.progress = Path(folder), metric, progress

    def better(self, value: float) -> bool:
        best = self.progress.best
        if best is None:
            return True
        assert self.metric is not None
        return value < best["value"] if self.metric.endswith(LOWER_IS_BETTER) else value > best["value"]

    def offer(self, epoch: int, metrics: dict[str, float], model: torch.nn.Module, loss_fn: torch.nn.Module) -> bool:
        """Keep ``model`` and ``loss_fn`` when ``metrics[metric]`` (validation) beats the best so far."""
        if self.metric is None:
            return False
        if self.metric not in metrics:
            raise ValueError(
                f"train.keep_best: {self.metric!r} is not a metric of the validation split; it gives "
                f"{', '.join(sorted(metrics))}"
            )
        value = float(metrics[self.metric])
        if not self.better(value):
            return False
        partial = self.folder.with_name(self.folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        atomic_save_tensors(partial / "model.safetensors", _state(model))
        atomic_save_tensors(partial / "loss.safetensors", _state(loss_fn))
        record = {"epoch": int(epoch), "metric": f"val_{self.metric}", "value": value}
        atomic_write_json(partial / "best.json", record)
        shutil.rmtree(self.folder, ignore_errors=True)
        partial.rename(self.folder)
        self.progress.best = record
        return True

    def select(self, model: torch.nn.Module, loss_fn: torch.nn.Module, last_epoch: int) -> dict[str, Any]:
        """Load the chosen weights into ``model`` and ``loss_fn`` (the best epoch's, or leave the last) and say
        which checkpoint and why."""
        if self.metric is None:
            return {"checkpoint": "last", "epoch": int(last_epoch), "why": "train.keep_best is off: the last epoch"}
        best = self.progress.best
        if best is None:
            raise ValueError(f"train.keep_best: {self.metric!r}: no epoch was evaluated on the validation split")
        import json

        from safetensors.torch import load_file

        try:
            stored = json.loads((self.folder / "best.json").read_text(encoding="utf-8"))
            model.load_state_dict(load_file(self.folder / "model.safetensors"))
            loss_fn.load_state_dict(load_file(self.folder / "loss.safetensors"))
        except Exception as err:  # noqa: BLE001 - a missing or torn file, from any of three readers
            raise ValueError(
                f"cannot load the best checkpoint {self.folder}: {str(err).splitlines()[0]} (train "
                "with --no-resume to start over)"
            ) from None
        if stored.get("epoch") != best["epoch"]:
            raise ValueError(
                f"{self.folder}/best.json holds epoch {stored.get('epoch')}, but the run's checkpoint "
                f"recorded epoch {best['epoch']} as its best (train with --no-resume to start over)"
            )
        return {
            "checkpoint": str(self.folder),
            **best,
            "why": f"the best validation {self.metric} of the epochs evaluated (train.keep_best)",
        }
