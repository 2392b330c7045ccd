"""Ground-floor file I/O: atomic writes (readers see the old file, the new file or none, never a half-written one),
umask-honouring modes, checksums, and clean-up of a killed writer's temporaries. Used by the cache, the trainer,
evaluation reports and the CLIs.

Every file is written to a temporary name in the same directory and moved into place with ``os.replace`` (atomic
on POSIX and Windows).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: `softalign --help` reads this module without importing torch
    import torch

PathLike = str | os.PathLike

__all__ = [
    "TMP_SUFFIX",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_tensors",
    "load_tensors",
    "file_sha256",
    "remove_stale_temporaries",
    "read_text",
    "read_json",
    "read_lines",
]


#: temporary files of :func:`atomic_write` are named ``.<final name>.<random>.tmp`` (see :func:`remove_stale_temporaries`)
TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=str(path.parent))
    try:
        # mkstemp creates 0600; a finished file gets the mode open() would give it (0666 minus the umask), so a
        # cache or a checkpoint shared on a cluster stays readable by the group / others when the umask says so
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def remove_stale_temporaries(directory: PathLike) -> int:
    """Delete the temporary files that a killed :func:`atomic_write` left in ``directory`` (not recursive).

    Call it only while holding the directory's lock (:func:`softalign.locking.directory_lock`): a live writer's
    temporary file would be removed too. Returns how many were removed.
    """
    removed = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    for p in directory.glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            try:
                p.unlink()
                removed += 1
            except OSError:  # pragma: no cover - e.g. a read-only directory: harmless leftovers
                pass
    return removed


def atomic_write(path: PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` then move ``tmp_path`` onto ``path`` atomically (tmp removed on error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp.exists():
            tmp.unlink()
        if isinstance(err, OSError) and err.errno is not None:  # name the file being written, not its temporary
            raise type(err)(err.errno, err.strerror, str(path)) from None
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """``path`` <- ``text`` (UTF-8) through :func:`atomic_write`: readers see the old or the new file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: PathLike, obj) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=1, sort_keys=False)
            fh.write("\n")

    atomic_write(path, write)


def atomic_save_tensors(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` to a temporary file, then atomically into place."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # serialised in memory, then written by Python: a full disk is an OSError (ENOSPC) naming the file, not a
    # SafetensorError from inside the writer
    blob = save(tensors, metadata=metadata)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))


def file_sha256(path: PathLike, block: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in blocks (bounded memory)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def read_text(path: PathLike, what: str | None = None) -> str:
    """The UTF-8 text of ``path``. A missing file or a bad encoding is one error naming ``what`` (e.g. the flag
    ``"--captions"``) and the file."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{label}: not UTF-8 text ({err.reason} at byte {err.start}); convert it with iconv -t utf-8"
        ) from None


def read_json(path: PathLike, what: str | None = None) -> Any:
    """:func:`read_text` parsed as JSON; a syntax error names the file, the line and the column."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        label = f"{what} {path}" if what else str(path)
        raise ValueError(f"{label}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def read_lines(path: PathLike, what: str = "file") -> list[str]:
    """The non-empty, stripped lines of a UTF-8 text file; a missing file or bad encoding is named (``what``:
    how the message calls the file, e.g. ``"benchmark file"`` or ``"--captions"``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return [ln.strip() for ln in read_text(path).splitlines() if ln.strip()]
