"""Run ``accelerate.debug_launcher`` (2 CPU processes, gloo) from a fresh interpreter.

debug_launcher forks. Forking the pytest process after earlier tests have started torch's OpenMP thread pool can
leave a child waiting forever on a pool barrier, so the launcher runs in a new Python process that forks before
any parallel op. The target must be a module-level function; its assertion errors fail the test with the
children's output.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = (
    "import importlib, pickle, sys\n"
    "from accelerate import debug_launcher\n"
    "module, name, args, n = pickle.loads(sys.stdin.buffer.read())\n"
    "debug_launcher(getattr(importlib.import_module(module), name), args=tuple(args), num_processes=n)\n"
)


def debug_launch(fn, *args, num_processes: int = 2, timeout: float = 300) -> None:
    payload = pickle.dumps((fn.__module__, fn.__qualname__, args, num_processes))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    )
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], input=payload, capture_output=True, timeout=timeout, cwd=str(REPO), env=env
    )
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        raise AssertionError(f"{fn.__qualname__} failed under debug_launcher({num_processes}):\n{out[-6000:]}")
