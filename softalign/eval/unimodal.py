"""Uni-modal ("universal") retrieval: image->image and text->text with class or group labels.

Metrics come from pytorch-metric-learning's ``AccuracyCalculator`` (Musgrave et al., "A Metric
Learning Reality Check", ECCV 2020) with a non-faiss exact KNN
(``CustomKNN(CosineSimilarity())``, batched so memory stays bounded):

* ``precision_at_1`` (= Recall@1 in the metric-learning sense: the nearest neighbour shares the
  query's label; also reported as ``recall_at_1``);
* ``r_precision``: with R = number of same-label gallery items, the fraction of them in the top R;
* ``map_at_r``: MAP@R = 1/R * sum_{i<=R} P(i) * rel(i) (mean over queries);
* ``recall_at_{K}`` for K in ``ks`` (default 1, 2, 4, 8: the deep-metric-learning convention of CUB / Cars / SOP /
  In-Shop papers): the fraction of queries with at least one same-label item among their K nearest neighbours
  (computed here, in batches; K = 1 equals ``precision_at_1``).

Leave-one-out (``gallery=None``): every item is a query against all the others
(``ref_includes_query=True``, the query itself is removed). Query/gallery: separate sets.
Queries whose label does not occur in the gallery (or only once, leave-one-out) are skipped by
pytorch-metric-learning; ``num_queries`` counts the queries that were scored.

Text-text similarity (STS, Spearman of cosine similarity with human scores) is :mod:`softalign.eval.sts`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from softalign.eval.crossmodal import _as_tensor

__all__ = ["unimodal_retrieval", "uni_modal_metrics"]


def _emb(x: Any, name: str) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] tensor, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 items); the gallery and queries need at least one item")
    t = t.detach().cpu()
    if t.dtype != torch.float64:
        t = t.float()
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN values")
    return t


def _labels(x: Any, n: int, name: str) -> torch.Tensor:
    t = _as_tensor(x, name).reshape(-1)
    if t.dtype.is_floating_point:
        if bool(torch.isnan(t).any()):
            raise ValueError(f"{name} contains NaN")
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries but there are {n} embeddings; expected one label each")
    return t.detach().cpu()


def unimodal_retrieval(
    embeddings: Any,
    labels: Any,
    gallery: Any | None = None,
    gallery_labels: Any | None = None,
    *,
    batch_size: int = 1024,
    prefix: str = "",
    ks: tuple[int, ...] = (1, 2, 4, 8),
) -> dict[str, float]:
    """Recall@1 / precision@1, R-precision and MAP@R of ``embeddings`` (queries) against
    ``gallery`` (default: the queries themselves, leave-one-out). Cosine similarity.

    Returns ``{prefix+"precision_at_1", prefix+"recall_at_{K}" (K in ``ks``), prefix+"r_precision",
    prefix+"map_at_r", prefix+"num_queries"}``, in percent (0-100) like the cross-modal R@K."""
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive neighbour counts, got {ks}")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import (
        AccuracyCalculator,
        get_label_match_counts,
        get_lone_query_labels,
    )
    from pytorch_metric_learning.utils.inference import CustomKNN

    q = _emb(embeddings, "embeddings")
    ql = _labels(labels, q.shape[0], "labels")
    loo = gallery is None
    if loo:
        if gallery_labels is not None:
            raise ValueError("gallery_labels given without gallery")
        if q.shape[0] < 2:
            raise ValueError("leave-one-out needs at least 2 items (the gallery would be empty)")
        g, gl = q, ql
    else:
        if gallery_labels is None:
            raise ValueError("gallery given without gallery_labels")
        g = _emb(gallery, "gallery")
        gl = _labels(gallery_labels, g.shape[0], "gallery_labels")
        if g.shape[1] != q.shape[1]:
            raise ValueError(f"embedding sizes differ: queries are [*, {q.shape[1]}], gallery [*, {g.shape[1]}]")
    # labels -> contiguous integer codes shared by queries and gallery (floats compared exactly)
    _, codes = torch.unique(torch.cat([ql, gl]), return_inverse=True)
    qc, gc = codes[: len(ql)], codes[len(ql) :]
    if loo:
        gc = qc

    counts = get_label_match_counts(qc, gc, torch.eq)
    _, not_lone = get_lone_query_labels(qc, counts, loo, torch.eq)
    n_scored = int(not_lone.sum())
    if n_scored == 0:
        raise ValueError(
            "no query has a same-label item in the gallery"
            + (" (every label occurs once; leave-one-out needs labels shared by >= 2 items)" if loo else "")
        )
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(CosineSimilarity(), batch_size=batch_size),
    )
    if loo:
        res = calc.get_accuracy(q, qc, q, qc, ref_includes_query=True)
    else:
        res = calc.get_accuracy(q, qc, g, gc, ref_includes_query=False)
    out = {
        f"{prefix}precision_at_1": 100.0 * float(res["precision_at_1"]),
        f"{prefix}recall_at_1": 100.0 * float(res["precision_at_1"]),
        f"{prefix}r_precision": 100.0 * float(res["r_precision"]),
        f"{prefix}map_at_r": 100.0 * float(res["mean_average_precision_at_r"]),
        f"{prefix}num_queries": float(n_scored),
    }
    hits = _recall_at_k(
        q[not_lone],
        qc[not_lone],
        g,
        gc,
        tuple(int(k) for k in ks),
        batch_size,
        torch.nonzero(not_lone).flatten() if loo else None,
    )
    for k, v in hits.items():
        if k != 1:  # R@1 is PML's precision@1 above
            out[f"{prefix}recall_at_{k}"] = 100.0 * v
    return out


def uni_modal_metrics(
    image: Any,
    text: Any,
    image_labels: Any = None,
    text_labels: Any = None,
    image_uni: Any = None,
    text_uni: Any = None,
    skipped=None,
) -> dict[str, float]:
    """The uni-modal keys that ``softalign train``, ``softalign eval`` and the demo write, one meaning each:

    * ``i2i_*`` / ``t2t_*``: the model's uni-modal embeddings, USA's heads ``image_uni`` / ``text_uni`` when given
      (how CUSA evaluates uni-modal retrieval), else the joint embeddings;
    * ``i2i_xm_*`` / ``t2t_xm_*``: the joint (cross-modal) embeddings ``image`` / ``text``, for every model.

    Leave-one-out :func:`unimodal_retrieval` over the labels, in percent. A modality without labels, or whose
    labels are all distinct (leave-one-out is undefined), is left out; ``skipped(prefix, labels)`` is told."""
    out: dict[str, float] = {}
    for prefix, joint, uni, labels in (
        ("i2i_", image, image_uni, image_labels),
        ("t2t_", text, text_uni, text_labels),
    ):
        if labels is None or joint is None:
            continue
        if not has_shared_label(labels):
            if skipped is not None:
                skipped(prefix, labels)
            continue
        out.update(unimodal_retrieval(joint if uni is None else uni, labels, prefix=prefix))
        out.update(unimodal_retrieval(joint, labels, prefix=prefix + "xm_"))
    return out


def _recall_at_k(
    q: torch.Tensor,
    qc: torch.Tensor,
    g: torch.Tensor,
    gc: torch.Tensor,
    ks: tuple[int, ...],
    batch_size: int,
    self_index: torch.Tensor | None,
) -> dict[int, float]:
    """Fraction of queries with a same-label item among their K nearest gallery items (cosine), for each K;
    ``self_index``: leave-one-out, the gallery position of each query (excluded from its neighbours)."""
    qn = torch.nn.functional.normalize(q, dim=1)
    gn = torch.nn.functional.normalize(g, dim=1)
    k_max = min(max(ks), gn.shape[0] - (1 if self_index is not None else 0))
    first_hit = []
    for s in range(0, qn.shape[0], batch_size):
        sims = qn[s : s + batch_size] @ gn.T
        if self_index is not None:
            rows = torch.arange(sims.shape[0])
            sims[rows, self_index[s : s + batch_size]] = -float("inf")
        top = sims.topk(k_max, dim=1).indices
        match = gc[top] == qc[s : s + batch_size].view(-1, 1)
        # rank of the first same-label neighbour (k_max when none in the top k_max)
        first = torch.where(match.any(dim=1), match.float().argmax(dim=1), torch.full((match.shape[0],), k_max))
        first_hit.append(first)
    ranks = torch.cat(first_hit)
    return {k: float((ranks < k).double().mean()) for k in ks}


def has_shared_label(labels) -> bool:
    """Whether some label occurs at least twice: leave-one-out retrieval is defined only then."""

    codes = np.unique(np.asarray(labels), return_inverse=True)[1].ravel()
    return codes.size > 0 and int(np.bincount(codes).max()) >= 2
