"""Directory locks: one writer per cache build or training run directory.

Two ``softalign cache build`` runs into one directory used to race each other into a traceback, and two
``softalign train`` runs into one output directory both "succeeded" with interleaved metrics and each other's
checkpoints. :func:`directory_lock` takes an exclusive, non-blocking ``flock`` on ``DIR/.softalign.lock`` for the
duration of the work and writes the holder's pid, host and start time into it, so that the second process fails at
once with an error that names the first.

The lock is advisory and held by the kernel: it is released when the holder exits, however it exits (``kill -9``
included), so a crashed run never leaves a stale lock behind. The lock file itself stays (it is tiny and is reused).
On platforms without ``fcntl`` (Windows) the lock is a no-op.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".softalign.lock"


class DirectoryLockedError(RuntimeError):
    """Another process holds the lock of the directory (its pid, host and start time are in the message)."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return "another process"
    if not isinstance(info, dict):
        return "another process"
    return (
        f"{info.get('what', 'another process')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
        f"started {info.get('started', '?')})"
    )


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if needed) for the ``with`` block.

    ``what`` describes the work (e.g. ``"softalign cache build"``) and is shown to a second process, which gets
    :class:`DirectoryLockedError` instead of waiting. Yields the lock file's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    if fcntl is None:  # pragma: no cover
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryLockedError(
                f"{directory} is in use by {_holder(path)}: wait for it to finish, or use another directory"
            ) from None
        info = {
            "what": what,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock
