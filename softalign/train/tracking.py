"""``metrics.jsonl`` as an Accelerate tracker: the reference trainer logs through ``accelerator.log``, so the JSONL
file sits next to whatever trackers the user configured (``Accelerator(log_with="tensorboard" | "wandb" | ...)``).

Each record is one line, flushed and fsynced before the epoch's checkpoint is written: the checkpoint is the commit
point, and a resume drops the lines of later (uncommitted) epochs and a torn last line
(:func:`softalign.train.trainer.read_metrics`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker


class JsonlTracker(GeneralTracker):
    """Appends every logged dict (with ``step`` when given and absent) as a JSON line to ``path``."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:  # the run's recipe.yaml holds the configuration
        return None

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        record = dict(values)
        if step is not None:
            record.setdefault("step", step)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
