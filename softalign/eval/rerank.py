"""Two-stage (retrieve then re-rank) inference, as in TGDT.

Reference: Liu et al., "Efficient Token-Guided Image-Text Retrieval with Consistent Multimodal
Contrastive Training" (TGDT, Token-Guided Dual Transformer), IEEE TIP 2023, arXiv:2306.08789 --
global embeddings select the top-K candidates of each query, a fine (token-level / cross-attention)
scorer re-ranks only those.

Rule for a query whose target is not among its K coarse candidates: it is a **miss** -- its
0-based rank is reported as ``K`` ("beyond K"), so it is never a hit for any R@k with k <= K,
however highly the fine scorer would rate the target (the fine scorer never sees it). R@k for
k > K is undefined and refused. medr / meanr are therefore lower bounds when misses exist;
``i2t_miss`` / ``t2i_miss`` give the percentage of such queries. Inside the K candidates the rank
is the number of candidates whose fine score is strictly greater than the best positive's
(the same optimistic tie rule as :mod:`softalign.eval.crossmodal`).

``fine_scorer(image_idx, caption_idx) -> scores`` takes two aligned LongTensors of global indices
[P] (one (image, caption) pair each) and returns [P] scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from softalign.eval.crossmodal import (
    DEFAULT_KS,
    _as_tensor,
    _check_ks,
    check_caption_to_image,
    metrics_from_ranks,
)
from softalign.eval.recall import cross_modal_recall

Tensor = torch.Tensor
PairScorer = Callable[[Tensor, Tensor], Tensor]

__all__ = ["two_stage_rerank", "two_stage_ranks", "block_scorer_from_pairs"]


def block_scorer_from_pairs(fine_scorer: PairScorer) -> Callable[[Tensor, Tensor], Tensor]:
    """Turn a pair scorer into a block scorer ``(image_idx [a], caption_idx [b]) -> [a, b]``."""

    def block(ii: Tensor, cc: Tensor) -> Tensor:
        a, b = ii.numel(), cc.numel()
        return _pair_scores(fine_scorer, ii.repeat_interleave(b), cc.repeat(a)).view(a, b)

    return block


def _pair_scores(fine_scorer: PairScorer, ii: Tensor, cc: Tensor) -> Tensor:
    s = fine_scorer(ii, cc)
    if not isinstance(s, Tensor):
        s = _as_tensor(s, "fine_scorer output")
    s = s.detach().reshape(-1).cpu()
    if s.numel() != ii.numel():
        raise ValueError(f"fine_scorer returned {s.numel()} scores for {ii.numel()} pairs; expected one per pair")
    if not s.dtype.is_floating_point or s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    if bool(torch.isnan(s).any()):
        j = int(torch.nonzero(torch.isnan(s))[0])
        raise ValueError(
            f"fine_scorer produced a NaN score (image {int(ii[j])}, caption {int(cc[j])}); scores must be finite"
        )
    return s


def _rerank_direction(coarse_q, coarse_g, positive_of, fine_pairs, top_k, chunk, n_gallery):
    """Generic: queries are rows of coarse_q, gallery rows of coarse_g.

    positive_of(q_idx [c], cand [c, K]) -> bool mask [c, K]; fine_pairs(q_idx [c], cand [c, K])
    -> fine scores [c, K]. Returns 0-based ranks (K for misses) and the number of fine pairs."""
    nq = coarse_q.shape[0]
    ranks = torch.empty(nq, dtype=torch.long)
    for q0 in range(0, nq, chunk):
        q1 = min(q0 + chunk, nq)
        q_idx = torch.arange(q0, q1)
        coarse = coarse_q[q0:q1] @ coarse_g.T
        if bool(torch.isnan(coarse).any()):
            raise ValueError(f"coarse scores contain NaN for queries {q0}..{q1 - 1}; check the embeddings")
        cand = torch.topk(coarse, top_k, dim=1).indices.cpu()  # [c, K]
        pos = positive_of(q_idx, cand)
        fine = fine_pairs(q_idx, cand)
        best = torch.where(pos, fine, torch.full_like(fine, -math.inf)).amax(dim=1, keepdim=True)
        r = (fine > best).sum(dim=1)
        r[~pos.any(dim=1)] = top_k  # target outside the top-K: a miss, rank "beyond K"
        ranks[q0:q1] = r
    return ranks, nq * top_k


def two_stage_ranks(
    image_emb: Any,
    text_emb: Any,
    caption_to_image: Any,
    fine_scorer: PairScorer,
    top_k: int = 50,
    chunk_size: int = 256,
) -> dict[str, Any]:
    """0-based i2t / t2i ranks of the two-stage procedure (see module docstring)."""
    im = _as_tensor(image_emb, "image_emb")
    tx = _as_tensor(text_emb, "text_emb")
    if im.dim() != 2 or tx.dim() != 2 or im.shape[1] != tx.shape[1]:
        raise ValueError(
            f"image_emb and text_emb must be [N, D] with the same D, got {tuple(im.shape)} and {tuple(tx.shape)}"
        )
    if im.dtype not in (torch.float32, torch.float64):
        im = im.float()
    tx = tx.to(device=im.device, dtype=im.dtype)
    n_img, n_txt = im.shape[0], tx.shape[0]
    c2i = check_caption_to_image(caption_to_image, n_txt, n_img)
    if not callable(fine_scorer):
        raise TypeError(f"fine_scorer must be callable, got {type(fine_scorer).__name__}")
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k_i2t, k_t2i = min(int(top_k), n_txt), min(int(top_k), n_img)

    def i2t_pos(q, cand):
        return c2i[cand] == q.unsqueeze(1)

    def i2t_fine(q, cand):
        ii = q.unsqueeze(1).expand_as(cand).reshape(-1)
        return _pair_scores(fine_scorer, ii, cand.reshape(-1)).view(cand.shape)

    def t2i_pos(q, cand):
        return cand == c2i[q].unsqueeze(1)

    def t2i_fine(q, cand):
        cc = q.unsqueeze(1).expand_as(cand).reshape(-1)
        return _pair_scores(fine_scorer, cand.reshape(-1), cc).view(cand.shape)

    i2t, p1 = _rerank_direction(im, tx, i2t_pos, i2t_fine, k_i2t, chunk_size, n_txt)
    t2i, p2 = _rerank_direction(tx, im, t2i_pos, t2i_fine, k_t2i, chunk_size, n_img)
    return {"i2t": i2t, "t2i": t2i, "k_i2t": k_i2t, "k_t2i": k_t2i, "fine_pairs": p1 + p2}


def two_stage_rerank(
    image_emb: Any,
    text_emb: Any,
    caption_to_image: Any,
    fine_scorer: PairScorer,
    top_k: int = 50,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 256,
    compare_full: bool = True,
) -> dict[str, Any]:
    """Global top-K retrieval + fine re-ranking; reports recall, the change against full fine
    scoring of every pair, and the speed-up.

    Returns ``{"two_stage": metrics, "coarse": metrics (embeddings alone), "top_k": K,
    "time_two_stage_s", "fine_pairs_two_stage"}`` and, with ``compare_full=True``,
    ``"full_fine": metrics`` (every pair scored by ``fine_scorer``), ``"time_full_fine_s"``,
    ``"speedup"`` (= time_full_fine / time_two_stage) and ``"recall_change"`` (two_stage minus
    full_fine for each metric). Metric dicts have the :func:`cross_modal_recall` keys plus
    ``i2t_miss`` / ``t2i_miss`` (percent of queries whose target fell outside the top-K).
    """
    ks = _check_ks(ks)
    t0 = time.perf_counter()
    rr = two_stage_ranks(image_emb, text_emb, caption_to_image, fine_scorer, top_k, chunk_size)
    t_two = time.perf_counter() - t0
    for d in ("i2t", "t2i"):
        k_eff = rr[f"k_{d}"]
        n_gal = len(text_emb) if d == "i2t" else len(image_emb)
        if k_eff < n_gal and max(ks) > k_eff:
            raise ValueError(
                f"R@{max(ks)} is undefined with top_k={k_eff}: queries beyond the top-K have no rank; use ks <= top_k"
            )
    ts: dict[str, float] = {}
    ts.update(metrics_from_ranks(rr["i2t"], ks, "i2t_"))
    ts.update(metrics_from_ranks(rr["t2i"], ks, "t2i_"))
    ts["rsum"] = float(sum(ts[f"i2t_r{k}"] + ts[f"t2i_r{k}"] for k in ks))
    ts["i2t_miss"] = 100.0 * float((rr["i2t"] >= rr["k_i2t"]).double().mean()) if rr["k_i2t"] < len(text_emb) else 0.0
    ts["t2i_miss"] = 100.0 * float((rr["t2i"] >= rr["k_t2i"]).double().mean()) if rr["k_t2i"] < len(image_emb) else 0.0
    out: dict[str, Any] = {
        "two_stage": ts,
        "coarse": cross_modal_recall(
            image_emb=image_emb, text_emb=text_emb, caption_to_image=caption_to_image, ks=ks, chunk_size=chunk_size
        ),
        "top_k": int(top_k),
        "time_two_stage_s": t_two,
        "fine_pairs_two_stage": int(rr["fine_pairs"]),
    }
    if compare_full:
        t0 = time.perf_counter()
        full = cross_modal_recall(
            scorer=block_scorer_from_pairs(fine_scorer),
            caption_to_image=caption_to_image,
            num_images=len(image_emb),
            ks=ks,
            chunk_size=chunk_size,
        )
        t_full = time.perf_counter() - t0
        out["full_fine"] = full
        out["time_full_fine_s"] = t_full
        out["speedup"] = t_full / max(t_two, 1e-12)
        out["recall_change"] = {k: ts[k] - full[k] for k in full}
    return out
