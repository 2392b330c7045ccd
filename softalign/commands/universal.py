"""``softalign eval --universal`` on a model: loads the model (:mod:`softalign.commands.encoders`), encodes the
benchmarks and STS sets, and scores them with :mod:`softalign.eval` (the table and report are
:mod:`softalign.eval.universal`'s)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from softalign.eval.universal import RUN_HEADS, with_means

__all__ = ["universal_report"]


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
    from softalign.commands.encoders import encode_images, load_encoders
    from softalign.data.dml import load_dml_benchmark
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
        results[column] = with_means(metrics)
    return {"model": model, "columns": results}
