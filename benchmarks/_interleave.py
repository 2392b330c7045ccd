"""Interleaved timing for the benchmarks: every round runs each variant once, in turn, so that the drift of a
shared machine (other jobs, thermal state) hits all variants alike; min and median over the rounds are reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int = 5,
    inner: int = 1,
    warmup: int = 1,
    only_first_round: tuple[str, ...] = (),
) -> dict[str, dict[str, float]]:
    """``{name: {"min": s, "median": s, "n": rounds}}`` in seconds per call (``inner`` calls per measurement).
    Variants named in ``only_first_round`` (e.g. a minutes-long reference loop) run in the first round only."""
    for fn in variants.values():
        for _ in range(warmup if inner > 1 else 0):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            if r > 0 and name in only_first_round:
                continue
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: {"min": min(t), "median": statistics.median(t), "n": len(t)} for name, t in times.items()}


def fmt(t: dict[str, float], unit: float = 1.0, digits: int = 3) -> str:
    """``min / median (n)`` in the given unit (1 = seconds, 1e3 = ms)."""
    return f"{t['min'] * unit:.{digits}f} / {t['median'] * unit:.{digits}f} (n={t['n']})"
