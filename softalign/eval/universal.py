"""Universal retrieval in CUSA's layout: one model's uni-modal scores on image and text benchmarks, side by side.

CUSA (Huang et al., AAAI 2024) reports universal retrieval as image->image R@1 on deep-metric-learning benchmarks
(CUB, Cars, SOP, In-Shop, iNaturalist) and the Spearman correlation on STS sets (STS12-16, STS-B, SICK-R), each
with their averages. :func:`universal_report` computes exactly those for a model, and for a softalign run with
USA's heads both embeddings at once: ``uni`` (USA's uni-modal heads, as CUSA evaluates them) and ``cross`` (the
joint space). All numbers are in percent.

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


def universal_report(
    model: str,
    dml: Mapping[str, str] | None = None,
    sts: Sequence[str] = (),
    *,
    heads: Sequence[str] | None = None,
    weights: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
    device: Any = None,
) -> dict[str, Any]:
    """``{"model", "columns": {column: {metric: value}}}``: per column (``uni`` and ``cross`` for a softalign
    run with USA heads, else ``model``) ``dml_<name>_r1`` (image->image R@1, query vs gallery for In-Shop, else
    leave-one-out), ``sts_<name>_spearman`` / ``_pearson``, and the averages ``dml_mean_r1``,
    ``sts_mean_spearman`` and ``mean`` (of both families' averages). The benchmarks and sets are read (and
    checked) before anything is encoded."""
    from softalign.data.dml import load_dml_benchmark
    from softalign.eval.encode import encode_images, load_encoders
    from softalign.eval.sts import load_sts, sts_metrics
    from softalign.eval.unimodal import unimodal_retrieval

    dml = dict(dml or {})
    if not dml and not sts:
        raise ValueError("the universal report needs image benchmarks (--dml NAME=DIR) and/or STS sets (--sts)")
    sets = [load_sts(s) for s in sts]
    benches = {name: load_dml_benchmark(name, root, check_files=True) for name, root in dml.items()}
    is_run = not model.startswith(("open_clip:", "timm:", "st:"))
    columns = list(heads) if heads else (list(RUN_HEADS) if is_run else ["model"])
    results: dict[str, dict[str, float]] = {}
    for column in columns:
        try:
            image_enc, text_enc = load_encoders(
                model, heads="cross" if column == "model" else column, weights=weights, device=device
            )
        except ValueError as err:
            if column == "uni" and not heads and "no USA heads" in str(err):
                continue  # a run without USA heads: its joint space alone
            raise
        metrics: dict[str, float] = {}
        for name, bench in benches.items():
            if image_enc is None:
                raise ValueError(f"--model {model} has no image tower: --dml needs one")
            emb = encode_images(
                image_enc, bench.paths, batch_size=batch_size, progress=progress, desc=f"{name} ({column})"
            )
            labels = np.asarray(bench.labels)
            if bench.query is not None and bench.gallery is not None:
                q, g = np.asarray(bench.query), np.asarray(bench.gallery)
                r = unimodal_retrieval(emb[q], labels[q], gallery=emb[g], gallery_labels=labels[g], ks=(1,))
            else:
                r = unimodal_retrieval(emb, labels, ks=(1,))
            metrics[f"dml_{name}_r1"] = float(r["recall_at_1"])
        for s in sets:
            if text_enc is None:
                raise ValueError(f"--model {model} has no text tower: --sts needs one")
            metrics.update(sts_metrics(text_enc, s, prefix=f"sts_{s.name}_"))
        results[column] = _with_means(metrics)
    return {"model": model, "columns": results}


def _with_means(m: dict[str, float]) -> dict[str, float]:
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
