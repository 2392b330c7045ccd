"""Training checkpoints on Accelerate's ``save_state`` / ``load_state``, with nothing unpickled on resume.

Layout of ``OUTPUT_DIR/checkpoints/``::

    latest                 the name of the committed folder (written atomically, last)
    step-00000040/         accelerator.save_state(...):
        model.safetensors      the student (safetensors)
        optimizer.bin          the optimizer (accelerate reads it back with weights_only=True)
        random_states_0.pkl    RNG states, one per process (weights_only=True, numpy's types allow-listed)
        loss.safetensors       SoftAlignLoss: USA heads, temperatures, the calibrated tau_s   } softalign's, through
        train_state.json       epoch, step, batch, partial loss sums, recipe, vocabulary      } accelerate's hooks

The loss goes through ``register_save_state_pre_hook`` / ``register_load_state_pre_hook`` rather than
``register_for_checkpointing``: accelerate 1.16 reads registered objects back with ``weights_only=False``
(``checkpointing.load_custom_state``), i.e. it unpickles them, and a checkpoint may come from someone else.

The ``latest`` pointer is the commit point: a folder is named in it only once it is complete, and the folders it
no longer names are removed after it moved. A crash while saving leaves the previous checkpoint in force.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from softalign.io import atomic_save_tensors, atomic_write_json, atomic_write_text

LATEST = "latest"
TRAIN_STATE = "train_state.json"
LOSS_STATE = "loss.safetensors"
MODEL_STATE = "model.safetensors"  # accelerate's SAFE_MODEL_NAME + ".safetensors"

#: a save that fails with less free space than this on the checkpoint's disk is reported as "disk full"
#: (torch.save reports a full disk as "PytorchStreamWriter failed writing file", never as ENOSPC)
DISK_FULL_BYTES = 64 << 20


@dataclasses.dataclass
class TrainProgress:
    """Where a run stands: ``epoch`` epochs done, ``step`` optimizer steps, and inside epoch ``epoch + 1`` (a
    ``train.checkpoint_steps`` checkpoint) ``batch`` batches done with their running loss sums ``partial``."""

    recipe: dict[str, Any]
    vocab: list[str] | None = None
    epoch: int = 0
    step: int = 0
    batch: int = 0
    partial: dict[str, Any] | None = None
    #: the best validation epoch so far under ``train.keep_best`` (``epoch``, ``metric``, ``value``), else None
    best: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainProgress:
        return cls(
            recipe=d.get("recipe") or {},
            vocab=d.get("vocab"),
            epoch=int(d.get("epoch", 0)),
            step=int(d.get("step", 0)),
            batch=int(d.get("batch") or 0),
            partial=d.get("partial"),
            best=d.get("best"),
        )


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing part, corrupt or torn file, a pickled payload)."""


def _reason(err: BaseException) -> str:
    """One line on why a file did not load. torch's refusal of a pickled object is said plainly; its advice to load
    with ``weights_only=False`` (which would run whatever the file holds) is never passed on."""
    text = str(err)
    if any(k in text for k in ("Unsupported global", "Unsupported class", "unsupported GLOBAL")):
        return (
            "it holds pickled Python objects beyond tensors, which softalign never unpickles (a checkpoint may "
            "come from someone else)"
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cause = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("WeightsUnpickler error")), None)
    if cause is None:
        cause = next((ln for ln in lines if "weights_only" not in ln and "Weights only" not in ln), type(err).__name__)
    return f"not a readable checkpoint file, torn or of another kind ({cause})" if "Weights only" in text else cause


def _bad(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot load checkpoint file {path}: {_reason(err)} (delete its checkpoint, or train "
        "with --no-resume, to start over)"
    )


# ------------------------------------------------------------------------------------------------ locate
def latest_checkpoint(root: str | Path) -> Path | None:
    """The committed checkpoint under ``root`` (a ``checkpoints/`` directory): the folder ``latest`` names, else
    None. A ``latest`` naming a missing folder is an error naming both."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        folder = root / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(
                f"cannot load checkpoint {pointer}: it names {name!r}, which is not a folder inside "
                f"{root} (delete it, or train with --no-resume, to start over)"
            )
        if not folder.is_dir():
            raise CheckpointError(
                f"cannot load checkpoint {pointer}: it names {folder.name!r}, which does not "
                "exist (delete it, or train with --no-resume, to start over)"
            )
        return folder
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a training output directory, its ``checkpoints/`` or the folder itself."""
    path = Path(path)
    if (path / TRAIN_STATE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root) if root.is_dir() else None
        if found is not None:
            return found
    raise FileNotFoundError(
        f"checkpoint not found: {path} (expected a softalign train output directory, its "
        f"checkpoints/ with a '{LATEST}' file, or a checkpoint folder)"
    )


# ------------------------------------------------------------------------------------------------ read
def read_progress(path: str | Path) -> TrainProgress:
    """The :class:`TrainProgress` of the checkpoint at ``path`` (see :func:`resolve`), without its tensors."""
    path = resolve(path)
    try:
        return TrainProgress.from_dict(json.loads((path / TRAIN_STATE).read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError, TypeError) as err:  # unreadable, torn, or not an object
        raise _bad(path / TRAIN_STATE, err) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Everything a checkpoint holds, read without unpickling code: ``{"model", "loss"}`` (state dicts) plus the
    :class:`TrainProgress` fields (``epoch``, ``step``, ``batch``, ``partial``, ``recipe``, ``vocab``) and ``path``.
    ``path`` is resolved by :func:`resolve`."""
    from safetensors.torch import load_file

    path = resolve(path)
    out: dict[str, Any] = dataclasses.asdict(read_progress(path))
    for key, name in (("model", MODEL_STATE), ("loss", LOSS_STATE)):
        try:
            state = load_file(path / name)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a bad file
            raise _bad(path / name, err) from None
        if key == "model" and state and all(k.startswith("module.") for k in state):
            state = {k[len("module.") :]: v for k, v in state.items()}  # saved from a DDP-wrapped model
        out[key] = state
    return {**out, "path": path}


# ------------------------------------------------------------------------------------------------ hooks
def register_checkpoint_hooks(accelerator, loss_fn: torch.nn.Module, progress: TrainProgress) -> list:
    """Make ``accelerator.save_state`` / ``load_state`` carry the loss (``loss.safetensors``) and ``progress``
    (``train_state.json``). Returns the hook handles; call ``.remove()`` on each when the run ends."""

    def save_hook(models, weights, output_dir) -> None:
        if accelerator.is_main_process:
            atomic_save_tensors(
                Path(output_dir) / LOSS_STATE,
                {k: v.detach().cpu().contiguous() for k, v in loss_fn.state_dict().items()},
            )
            atomic_write_json(Path(output_dir) / TRAIN_STATE, dataclasses.asdict(progress))

    def load_hook(models, input_dir) -> None:
        from safetensors.torch import load_file

        try:
            loss_fn.load_state_dict(load_file(Path(input_dir) / LOSS_STATE))
        except Exception as err:  # noqa: BLE001
            raise _bad(Path(input_dir) / LOSS_STATE, err) from None

    return [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]


# ------------------------------------------------------------------------------------------------ write / restore
def save_training_state(accelerator, root: str | Path, progress: TrainProgress) -> Path:
    """``accelerator.save_state`` into ``root/step-<step>``, then commit it in ``root/latest`` and remove the
    folders it replaces. Every process calls it. A failed save removes its folder; the previous checkpoint stays."""
    root = Path(root)
    folder = root / f"step-{progress.step:08d}"
    pointer = root / LATEST
    if pointer.is_file() and pointer.read_text(encoding="utf-8").strip() == folder.name:
        folder = root / f"{folder.name}-again"  # a second save of the committed step must not overwrite it
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(folder, ignore_errors=True)  # a save of this step that did not commit
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(folder), safe_serialization=True)
    except Exception as err:
        if main:
            shutil.rmtree(folder, ignore_errors=True)
        if (
            not (isinstance(err, OSError) and err.errno == errno.ENOSPC)
            and shutil.disk_usage(root).free < DISK_FULL_BYTES
        ):
            raise OSError(errno.ENOSPC, "No space left on device", str(folder)) from err
        raise
    accelerator.wait_for_everyone()
    if main:
        _honour_umask(folder)
        atomic_write_text(pointer, folder.name + "\n")
        for old in root.glob("step-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    return folder


def _honour_umask(folder: Path) -> None:
    """Give the checkpoint's files the mode the process umask gives new files (safetensors writes 0600)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for file in folder.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)


def restore_training_state(accelerator, path: Path, model, loss_fn, optimizer) -> None:
    """Load the checkpoint ``path`` (from :func:`latest_checkpoint`) into the prepared ``model`` and ``optimizer``
    and into ``loss_fn`` (whose hooks :func:`register_checkpoint_hooks` registered)."""
    _warn_unreadable_rng_state(path, accelerator.process_index)
    try:
        accelerator.load_state(str(path))
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - torch / safetensors raise many types for a bad file
        raise _bad(_culprit(path) or path, err) from None


def _culprit(path: Path) -> Path | None:
    """After a failed ``load_state``: the first of the checkpoint's files that does not load on its own (read as
    accelerate reads it: safetensors, or ``torch.load(weights_only=True)``), to name it in the error."""
    from accelerate.utils import load as accelerate_load
    from safetensors.torch import load_file

    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        try:
            load_file(file) if file.suffix == ".safetensors" else accelerate_load(file, map_location="cpu")
        except Exception:  # noqa: BLE001 - any failure names this file
            return file
    return None


def _warn_unreadable_rng_state(path: Path, process_index: int) -> None:
    """accelerate skips an RNG file it cannot read and resumes silently; say so, naming the file."""
    from accelerate.utils import load as accelerate_load

    file = path / f"random_states_{process_index}.pkl"
    if not file.is_file():
        return
    try:
        accelerate_load(file)
    except Exception as err:  # noqa: BLE001 - a torn file or a pickled payload: either way it is not restored
        warnings.warn(
            f"checkpoint file {file}: the random-number state was not restored ({_reason(err)}); the "
            "run resumes, but its random draws (shuffles, augmentation) differ from an uninterrupted run's",
            UserWarning,
            stacklevel=3,
        )
