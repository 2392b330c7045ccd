"""Reports: metrics as JSON, a markdown table and a recall@K plot (PNG), for one run or a
comparison of several (e.g. ``{"base": m0, "+CUSA": m1}``). Files are written to a temporary
name and moved into place (``os.replace``) so a half-written report is never read."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from softalign.io import atomic_write_text

__all__ = [
    "atomic_write_text",
    "markdown_table",
    "comparison_table",
    "plot_recall_at_k",
    "write_report",
    "compare_runs",
]

_RK = re.compile(r"^(?:(?P<pre>.*)/)?(?P<dir>i2t|t2i)_r(?P<k>\d+)$")
_ORDER = ["i2t_r", "i2t_medr", "i2t_meanr", "t2i_r", "t2i_medr", "t2i_meanr", "rsum"]


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def _sort_key(name: str):
    base = name.split("/")[-1]
    pre = name[: -len(base)]
    m = _RK.match(base)
    for i, p in enumerate(_ORDER):
        if base.startswith(p):
            return (pre, i, int(m.group("k")) if m else 0, base)
    return (pre, len(_ORDER), 0, base)


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    return f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.4f}"


def markdown_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """One-run table: a row per scalar metric (non-numeric entries such as per-fold lists are skipped)."""
    return comparison_table({title or "value": metrics})


def comparison_table(runs: Mapping[str, Mapping[str, Any]], baseline: str | None = None) -> str:
    """Markdown table, one column per run; with ``baseline`` (a run name, default the first run
    when there are two or more) a last column gives ``last run - baseline``."""
    if not runs:
        raise ValueError("no runs to report")
    cols = {name: _scalars(m) for name, m in runs.items()}
    names = list(cols)
    keys = sorted({k for m in cols.values() for k in m}, key=_sort_key)
    if not keys:
        raise ValueError("the runs hold no numeric metrics")
    if baseline is None and len(names) >= 2:
        baseline = names[0]
    if baseline is not None and baseline not in cols:
        raise ValueError(f"baseline {baseline!r} is not one of the runs {names}")
    show_delta = baseline is not None and len(names) >= 2
    last = names[-1]
    head = ["metric"] + names + ([f"{last} - {baseline}"] if show_delta else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for k in keys:
        row = [k] + [_fmt(cols[n][k]) if k in cols[n] else "" for n in names]
        if show_delta:
            a, b = cols[last].get(k), cols[str(baseline)].get(k)
            row.append(f"{a - b:+.2f}" if a is not None and b is not None else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _curves(metrics: Mapping[str, Any]):
    """{direction: ([k...], [recall...])} from a "recall_curve" entry or from *_r{K} keys."""
    curve = metrics.get("recall_curve") if isinstance(metrics, Mapping) else None
    out = {}
    if isinstance(curve, Mapping) and "k" in curve:
        for d, v in curve.items():  # "i2t", "t2i", or per protocol "coco1k/i2t", ...
            if d.rsplit("/", 1)[-1] in ("i2t", "t2i") and isinstance(v, (list, tuple)):
                out[d] = (list(curve["k"]), list(v))
        if out:
            return out
    for key, v in _scalars(metrics).items():
        m = _RK.match(key)
        if m and not m.group("pre"):
            out.setdefault(m.group("dir"), ([], []))
            out[m.group("dir")][0].append(int(m.group("k")))
            out[m.group("dir")][1].append(v)
    for d, (ks, vs) in list(out.items()):
        order = sorted(range(len(ks)), key=lambda i: ks[i])
        out[d] = ([ks[i] for i in order], [vs[i] for i in order])
    return out


def plot_recall_at_k(runs: Mapping[str, Mapping[str, Any]], path: str, title: str = "Recall@K") -> str:
    """Plot R@K vs K (log-x) for each run and direction into a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    drawn, all_ks = 0, set()
    for name, m in runs.items():
        for d, (ks, vs) in _curves(m).items():
            ax.plot(ks, vs, marker="o", linestyle="-" if d.endswith("i2t") else "--", label=f"{name} {d}")
            all_ks.update(ks)
            drawn += 1
    if drawn == 0:
        plt.close(fig)
        raise ValueError("no recall@K values to plot (expected keys like 'i2t_r1' or a 'recall_curve')")
    ax.set_xscale("log")
    ax.set_xticks(sorted(all_ks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from softalign.io import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


def _jsonable(x: Any) -> Any:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return x.tolist()
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_report(
    metrics: Mapping[str, Any], out_dir: str, title: str = "softalign eval", plot: bool = True
) -> dict[str, str]:
    """Write ``metrics.json``, ``metrics.md`` and (if recall@K values exist) ``recall_at_k.png``."""
    paths = {"json": os.path.join(out_dir, "metrics.json"), "markdown": os.path.join(out_dir, "metrics.md")}
    atomic_write_text(paths["json"], json.dumps(_jsonable(metrics), indent=2, sort_keys=True) + "\n")
    md = f"# {title}\n\n" + markdown_table(metrics)
    curve = metrics.get("recall_curve")
    if isinstance(curve, Mapping) and curve.get("gallery"):
        md += f"\nrecall@K curve (metrics.json `recall_curve`, recall_at_k.png): {curve['gallery']}\n"
    atomic_write_text(paths["markdown"], md)
    if plot and _curves(metrics):
        paths["png"] = plot_recall_at_k({title: metrics}, os.path.join(out_dir, "recall_at_k.png"), title)
    return paths


def compare_runs(
    runs: Mapping[str, Mapping[str, Any]],
    out_dir: str | None = None,
    title: str = "Retrieval comparison",
    baseline: str | None = None,
) -> str:
    """Markdown comparison of several runs (``{name: metrics}``, e.g. ``{"base": m0, "+CUSA": m1}``)
    with a ``last - baseline`` column; with ``out_dir`` also writes ``comparison.md``,
    ``comparison.json`` and ``comparison_recall_at_k.png``. Returns the markdown."""
    md = f"## {title}\n\n" + comparison_table(runs, baseline)
    if out_dir is not None:
        atomic_write_text(os.path.join(out_dir, "comparison.md"), md)
        atomic_write_text(
            os.path.join(out_dir, "comparison.json"),
            json.dumps(_jsonable(dict(runs)), indent=2, sort_keys=True) + "\n",
        )
        if any(_curves(m) for m in runs.values()):
            plot_recall_at_k(runs, os.path.join(out_dir, "comparison_recall_at_k.png"), title)
    return md
