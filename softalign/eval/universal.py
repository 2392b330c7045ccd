"""Universal retrieval in CUSA's layout: one model's uni-modal scores on image and text benchmarks, side by side.

CUSA (Huang et al., AAAI 2024) reports universal retrieval as image->image R@1 on deep-metric-learning benchmarks
(CUB, Cars, SOP, In-Shop, iNaturalist) and the Spearman correlation on STS sets (STS12-16, STS-B, SICK-R), each
with their averages. :func:`softalign.commands.universal.universal_report` computes exactly those for a model,
and for a softalign run with USA's heads both embeddings at once: ``uni`` (USA's uni-modal heads, as CUSA
evaluates them) and ``cross`` (the joint space). This module holds the table, the report files and the
``--dml`` parsing; all numbers are in percent.

    softalign eval --model runs/coco_clip/csa_usa --universal --dml sop=data/Stanford_Online_Products \\
        cub=data/CUB_200_2011 --sts stsb sickr data/sts15.csv --out runs/universal
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: the embeddings compared for a softalign run: USA's heads and the joint space
RUN_HEADS = ("uni", "cross")


def parse_dml(items: Sequence[str]) -> dict[str, str]:
    """``["sop=DIR", ...]`` -> ``{"sop": "DIR", ...}``; a malformed item or an unknown benchmark is named."""
    from softalign.data.dml import BENCHMARKS

    out: dict[str, str] = {}
    for item in items:
        name, sep, root = item.partition("=")
        if not sep or not root:
            raise ValueError(f"--dml {item!r}: expected NAME=DIR, e.g. sop=data/Stanford_Online_Products")
        if name not in BENCHMARKS:
            raise ValueError(f"--dml {item!r}: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        out[name] = root
    return out


def with_means(m: dict[str, float]) -> dict[str, float]:
    dml = [v for k, v in m.items() if k.startswith("dml_") and k.endswith("_r1")]
    sts = [v for k, v in m.items() if k.startswith("sts_") and k.endswith("_spearman")]
    out = dict(m)
    if dml:
        out["dml_mean_r1"] = float(np.mean(dml))
    if sts:
        out["sts_mean_spearman"] = float(np.mean(sts))
    if dml and sts:
        out["mean"] = (out["dml_mean_r1"] + out["sts_mean_spearman"]) / 2
    return out


#: how the report names each column
COLUMN_NAMES = {"uni": "USA heads (uni)", "cross": "joint space (cross)"}


def universal_table(report: Mapping[str, Any]) -> str:
    """Markdown: a row per metric, a column per embedding (and their difference for a run's two)."""
    from softalign.eval.report import comparison_table

    return comparison_table({COLUMN_NAMES.get(c, str(report["model"])): m for c, m in report["columns"].items()})


def write_universal_report(
    report: Mapping[str, Any], out_dir: str | Path, title: str = "softalign universal", plot: bool = True
) -> dict[str, str]:
    """``universal.json``, ``universal.md`` (a row per metric, a column per embedding) and ``universal.png`` (a
    bar per embedding and metric)."""
    import json

    from softalign.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = report["columns"]
    paths = {"json": str(out / "universal.json"), "markdown": str(out / "universal.md")}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, sort_keys=True) + "\n")
    names = {**COLUMN_NAMES, "model": str(report["model"])}
    atomic_write_text(
        paths["markdown"],
        f"# {title}\n\nmodel: `{report['model']}` (percent: DML R@1, STS Spearman x 100)\n\n{universal_table(report)}",
    )
    if plot:
        paths["plot"] = _plot(columns, str(out / "universal.png"), names, title)
    return paths


def _plot(columns: Mapping[str, Mapping[str, float]], path: str, names: Mapping[str, str], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    metrics = [k for k in next(iter(columns.values())) if k.endswith(("_r1", "_spearman")) or k == "mean"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(metrics) * len(columns)), 3.6))
    width = 0.8 / len(columns)
    for j, (column, m) in enumerate(columns.items()):
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, [m.get(k, 0.0) for k in metrics], width, label=names.get(column, column))
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([k.replace("_spearman", "").replace("_r1", " R@1") for k in metrics], rotation=30, ha="right")
    ax.set_ylabel("percent")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
