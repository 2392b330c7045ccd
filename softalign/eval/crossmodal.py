"""Cross-modal retrieval metrics (image->text "i2t", text->image "t2i"), VSE++ definitions.

Reference: Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
BMVC 2018, ``evaluation.py`` (functions ``i2t`` / ``t2i``). With ``S`` the [N_images, N_captions]
score matrix (images as rows), ``c2i`` the caption -> image map and 0-based ranks:

    i2t:  rank(i) = min_{c : c2i[c] = i} position of c in argsort(-S[i, :])
    t2i:  rank(c) = position of c2i[c] in argsort(-S[:, c])
    R@K   = 100 * |{q : rank(q) < K}| / |queries|
    medr  = floor(median(rank)) + 1
    meanr = mean(rank) + 1
    rsum  = sum over K in ks of (i2t R@K + t2i R@K)      (ks = (1, 5, 10) gives the usual rsum)

Tie rule (documented, VSE++'s ``argsort`` leaves it unspecified): a query's rank is the number of
gallery items scored *strictly higher* than its best positive, i.e. ties are resolved in favour of
the positive ("optimistic"). ``ties="pessimistic"`` instead counts every non-positive item scored
``>=`` the best positive. On tie-free score rows both equal VSE++'s argsort rank exactly.

The best positive of image ``i`` is the caption with the highest score, so
``rank_i2t(i) = |{c : S[i, c] > max_{c' in P(i)} S[i, c']}|`` -- a count, no sort needed. The
matrix is processed in tiles so memory stays bounded (``chunk_size`` images x
``gallery_chunk_size`` captions); each score is computed exactly once and used by both
directions, so i2t and t2i always see the same matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor

DEFAULT_KS = (1, 5, 10)

__all__ = [
    "DEFAULT_KS",
    "RankResult",
    "cross_modal_ranks",
    "metrics_from_ranks",
    "recall_curve",
    "check_caption_to_image",
]


@dataclass
class RankResult:
    """0-based ranks: ``i2t`` [N_images] (best caption of each image), ``t2i`` [N_captions]."""

    i2t: Tensor
    t2i: Tensor


# ----------------------------------------------------------------------------------------- checks
def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, (list, tuple)):
        return torch.as_tensor(x)
    raise TypeError(f"{name} must be a torch.Tensor, numpy array or list, got {type(x).__name__}")


def check_caption_to_image(caption_to_image: Any, num_captions: int, num_images: int) -> Tensor:
    """Validate the caption -> image map for retrieval (every image needs a caption for i2t); see
    :func:`softalign.ids.check_caption_to_image`."""
    from softalign.ids import check_caption_to_image as check

    return check(
        _as_tensor(caption_to_image, "caption_to_image"), num_captions, num_images, every_image_captioned=True
    )


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks}")
    return ks


def _check_finite(block: Tensor, rows: Tensor, cols: Tensor, what: str) -> None:
    nan = torch.isnan(block)
    if bool(nan.any()):
        r, c = (int(v) for v in torch.nonzero(nan)[0])
        raise ValueError(
            f"{what} produced NaN scores (first at image {int(rows[r])}, caption {int(cols[c])}); "
            "scores must be finite numbers"
        )


# ------------------------------------------------------------------------------- block providers


def _take(x: Any, idx: Tensor) -> Any:
    if isinstance(x, Tensor):
        return x.index_select(0, idx.to(x.device))
    if isinstance(x, np.ndarray):
        return x[idx.numpy()]
    return [x[int(i)] for i in idx]


def _make_block_fn(sims, image_emb, text_emb, scorer) -> tuple[Any, int | None, int | None, str]:
    """Return (block(image_idx, caption_idx) -> [a, b] float tensor, N_images, N_captions, label)."""
    if scorer is not None:
        if sims is not None:
            raise ValueError("pass either sims or scorer, not both")
        if not callable(scorer):
            raise TypeError(f"scorer must be callable, got {type(scorer).__name__}")
        if (image_emb is None) != (text_emb is None):
            raise ValueError("with a scorer pass both images and texts (or neither, to get indices)")
        if image_emb is None:
            n_img = n_txt = None  # caller must give sizes via caption_to_image / num_images

            def block(ii, cc):
                return scorer(ii, cc)

            return block, n_img, n_txt, "scorer"
        n_img, n_txt = len(image_emb), len(text_emb)

        def block(ii, cc):
            return scorer(_take(image_emb, ii), _take(text_emb, cc))

        return block, n_img, n_txt, "scorer"
    if sims is not None:
        if image_emb is not None or text_emb is not None:
            raise ValueError("pass either sims or (image_emb, text_emb), not both")
        s = _as_tensor(sims, "sims")
        if s.dim() != 2:
            raise ValueError(f"sims must be a 2-D [N_images, N_captions] matrix, got shape {tuple(s.shape)}")
        if not s.dtype.is_floating_point:
            s = s.float()

        def block(ii, cc):
            return s.index_select(0, ii.to(s.device)).index_select(1, cc.to(s.device))

        setattr(block, "by_range", lambda a0, a1, p0, p1: s[a0:a1, p0:p1])  # a view, no copy  # noqa: B010
        return block, s.shape[0], s.shape[1], "sims"
    if image_emb is None or text_emb is None:
        raise ValueError("pass sims, or image_emb and text_emb, or a scorer")
    im = _as_tensor(image_emb, "image_emb")
    tx = _as_tensor(text_emb, "text_emb")
    if im.dim() != 2 or tx.dim() != 2:
        raise ValueError(f"image_emb and text_emb must be 2-D [N, D], got {tuple(im.shape)} and {tuple(tx.shape)}")
    if im.shape[1] != tx.shape[1]:
        raise ValueError(f"embedding sizes differ: image_emb is [*, {im.shape[1]}] and text_emb is [*, {tx.shape[1]}]")
    if im.dtype not in (torch.float32, torch.float64):
        im = im.float()
    if tx.dtype != im.dtype:
        tx = tx.to(im.dtype)
    tx = tx.to(im.device)

    def emb_block(ii, cc):
        return im.index_select(0, ii.to(im.device)) @ tx.index_select(0, cc.to(im.device)).T

    setattr(emb_block, "by_range", lambda a0, a1, p0, p1: im[a0:a1] @ tx[p0:p1].T)  # noqa: B010

    for t, name in ((im, "image_emb"), (tx, "text_emb")):
        # fast path: a sum is finite only if every entry is (NaN/inf propagate); else look closer
        if t.numel() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            bad = int(torch.nonzero(~torch.isfinite(t))[0, 0])
            raise ValueError(f"{name} row {bad} holds NaN or inf; embeddings must be finite")
    # with finite inputs a dot product can only become NaN through overflow (inf - inf); when the
    # bound below rules that out the per-tile NaN scan is skipped
    bound = float(im.abs().max()) * float(tx.abs().max()) * im.shape[1] if im.numel() and tx.numel() else 0.0
    setattr(emb_block, "may_be_nan", not bound < torch.finfo(im.dtype).max / 2)  # noqa: B010

    return emb_block, im.shape[0], tx.shape[0], "embeddings"


#: captions per score tile by default: tiles are chunk_size images x this many captions, so memory is bounded
#: whatever the gallery (512 x 8192 fp32 = 16 MB per tile, instead of 512 x all captions: 511 MB at 100K captions)
DEFAULT_GALLERY_CHUNK = 8192


# ---------------------------------------------------------------------------------- rank engine
def _count(mask: Tensor, dim: int) -> Tensor:
    """Number of True along ``dim``; a narrow accumulator is markedly faster on CPU."""
    n = mask.shape[dim]
    dtype = torch.int16 if n <= 32767 else torch.int32 if n <= 2**31 - 1 else torch.int64
    return mask.sum(dim=dim, dtype=dtype).to(torch.long)


def _tiles(n_images: int, order: Tensor, cap_start: Tensor, chunk: int, gchunk: int):
    """Yield (diag, image_range, caption positions in sorted order) partitioning the matrix.

    Captions are visited in ``order`` (sorted by image); images [a0, a1) own the contiguous
    sorted positions [cap_start[a0], cap_start[a1]). For each image chunk the "diagonal" tile
    holds all its positives; the remaining captions are split in ``gchunk`` pieces."""
    n_cap = order.numel()
    for a0 in range(0, n_images, chunk):
        a1 = min(a0 + chunk, n_images)
        p0, p1 = int(cap_start[a0]), int(cap_start[a1])
        yield True, (a0, a1), [(p0, p1)]
    for a0 in range(0, n_images, chunk):
        a1 = min(a0 + chunk, n_images)
        p0, p1 = int(cap_start[a0]), int(cap_start[a1])
        pieces = []
        for lo, hi in ((0, p0), (p1, n_cap)):
            for s in range(lo, hi, gchunk):
                pieces.append((s, min(s + gchunk, hi)))
        yield False, (a0, a1), pieces


def cross_modal_ranks(
    *,
    sims: Any | None = None,
    image_emb: Any | None = None,
    text_emb: Any | None = None,
    caption_to_image: Any | None = None,
    scorer: Callable | None = None,
    num_images: int | None = None,
    chunk_size: int | None = 512,
    gallery_chunk_size: int | None = DEFAULT_GALLERY_CHUNK,
    ties: str = "optimistic",
) -> RankResult:
    """0-based i2t / t2i ranks (see module docstring for the definitions and the tie rule).

    Inputs (one of): ``sims`` [N_images, N_captions]; ``image_emb`` [Ni, D] and ``text_emb``
    [Nt, D] (scores = dot products, normalise first for cosine); or ``scorer``, a callable
    returning a [a, b] score block, called as ``scorer(image_idx, caption_idx)`` (LongTensors of
    global indices; pass ``num_images``) or, when ``image_emb``/``text_emb`` are also given (any
    indexable: tensors, arrays, lists of features), as ``scorer(images_chunk, texts_chunk)``.
    ``chunk_size`` images x ``gallery_chunk_size`` captions bounds each tile (default 512 x 8192; None: no bound).
    The inputs are keyword-only.
    """
    if ties not in ("optimistic", "pessimistic"):
        raise ValueError(f"ties must be 'optimistic' or 'pessimistic', got {ties!r}")
    if caption_to_image is None:
        raise ValueError("caption_to_image is required (LongTensor [N_captions] of image indices)")
    block_fn, n_img, n_txt, what = _make_block_fn(sims, image_emb, text_emb, scorer)
    c2i_raw = _as_tensor(caption_to_image, "caption_to_image").reshape(-1)
    if n_txt is None:
        n_txt = c2i_raw.numel()
    if n_img is None:
        if num_images is None:
            raise ValueError("scorer over indices: pass num_images (the number of gallery images)")
        n_img = int(num_images)
    elif num_images is not None and int(num_images) != n_img:
        raise ValueError(f"num_images={num_images} but the inputs hold {n_img} images")
    c2i = check_caption_to_image(c2i_raw, n_txt, n_img)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    if gallery_chunk_size is not None and gallery_chunk_size < 1:
        raise ValueError(f"gallery_chunk_size must be a positive integer or None, got {gallery_chunk_size}")
    chunk = n_img if chunk_size is None else int(chunk_size)
    gchunk = n_txt if gallery_chunk_size is None else int(gallery_chunk_size)

    order = torch.sort(c2i, stable=True).indices  # captions grouped by image
    by_range = getattr(block_fn, "by_range", None)
    if by_range is not None and not bool((order == torch.arange(n_txt)).all()):
        by_range = None  # captions not already grouped: gather instead of slicing
    counts = torch.bincount(c2i, minlength=n_img)
    cap_start = torch.zeros(n_img + 1, dtype=torch.long)
    cap_start[1:] = torch.cumsum(counts, 0)
    sorted_c2i = c2i[order]

    # accumulators live on the device of the first score tile (GPU tiles are counted on the GPU)
    dev = None
    i2t_best: Any = None  # [Ni] best positive score per image
    t2i_pos: Any = None  # [Nt] positive score per caption (indexed by sorted position)
    i2t_rank: Any = None
    t2i_rank: Any = None  # by sorted position
    strict = ties == "optimistic"
    check_nan = getattr(block_fn, "may_be_nan", True)

    for diag, (a0, a1), pieces in _tiles(n_img, order, cap_start, chunk, gchunk):
        rows = torch.arange(a0, a1)
        for p0, p1 in pieces:
            if p1 <= p0:
                continue
            cols = order[p0:p1]
            blk = by_range(a0, a1, p0, p1) if by_range is not None else block_fn(rows, cols)
            if not isinstance(blk, Tensor):
                blk = _as_tensor(blk, "scorer output")
            if tuple(blk.shape) != (a1 - a0, p1 - p0):
                raise ValueError(
                    f"{what} returned a block of shape {tuple(blk.shape)} for {a1 - a0} images x "
                    f"{p1 - p0} captions; expected [{a1 - a0}, {p1 - p0}]"
                )
            blk = blk.detach()
            if not blk.dtype.is_floating_point:
                blk = blk.float()
            elif blk.dtype in (torch.float16, torch.bfloat16):
                blk = blk.float()
            if dev is None:
                dev = blk.device
                i2t_rank = torch.zeros(n_img, dtype=torch.long, device=dev)
                t2i_rank = torch.zeros(n_txt, dtype=torch.long, device=dev)
                sorted_c2i = sorted_c2i.to(dev)
            elif blk.device != dev:
                blk = blk.to(dev)
            if check_nan and bool(torch.isnan(blk.sum())):  # one fast reduction; NaN propagates
                _check_finite(blk, rows, cols, what)
            if diag:
                if i2t_best is None:
                    i2t_best = torch.full((n_img,), -math.inf, dtype=blk.dtype, device=dev)
                    t2i_pos = torch.empty(n_txt, dtype=blk.dtype, device=dev)
                local = sorted_c2i[p0:p1] - a0  # row of each column's image inside the tile
                pos_cells = (local, torch.arange(p1 - p0, device=dev))  # every positive of this chunk
                pos_vals = blk[pos_cells]
                t2i_pos[p0:p1] = pos_vals
                # best positive per image: max over its captions' scores (sparse, no full-tile pass)
                i2t_best[a0:a1] = i2t_best[a0:a1].scatter_reduce(0, local, pos_vals, reduce="amax")
            best = i2t_best[a0:a1].to(blk.dtype).unsqueeze(1)
            pos = t2i_pos[p0:p1].to(blk.dtype).unsqueeze(0)
            if strict:
                above_i2t = blk > best
                above_t2i = blk > pos
            else:
                above_i2t = blk >= best
                above_t2i = blk >= pos
                if diag:  # positives never count against their own query
                    above_i2t[pos_cells] = False
                    above_t2i[pos_cells] = False
            i2t_rank[a0:a1] += _count(above_i2t, 1)
            t2i_rank[p0:p1] += _count(above_t2i, 0)

    t2i_out = torch.empty(n_txt, dtype=torch.long)
    t2i_out[order] = t2i_rank.cpu()
    return RankResult(i2t=i2t_rank.cpu(), t2i=t2i_out)


# -------------------------------------------------------------------------------------- metrics
def metrics_from_ranks(ranks: Any, ks: Sequence[int] = DEFAULT_KS, prefix: str = "") -> dict[str, float]:
    """R@K (percent), medr and meanr from 0-based ranks, exactly as VSE++ computes them."""
    r = np.asarray(ranks.cpu().numpy() if isinstance(ranks, Tensor) else ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks given (empty query set)")
    out = {}
    for k in _check_ks(ks):
        out[f"{prefix}r{k}"] = 100.0 * len(np.where(r < k)[0]) / len(r)
    out[f"{prefix}medr"] = float(np.floor(np.median(r)) + 1)
    out[f"{prefix}meanr"] = float(r.mean() + 1)
    return out


def recall_curve(ranks: Any, ks: Sequence[int]) -> list:
    """[R@K for K in ks] in percent from 0-based ranks."""
    r = np.asarray(ranks.cpu().numpy() if isinstance(ranks, Tensor) else ranks)
    return [100.0 * float((r < k).mean()) for k in _check_ks(ks)]


def _plain_recall(
    *,
    sims=None,
    image_emb=None,
    text_emb=None,
    caption_to_image=None,
    ks=DEFAULT_KS,
    scorer=None,
    num_images=None,
    chunk_size=512,
    gallery_chunk_size=DEFAULT_GALLERY_CHUNK,
    ties="optimistic",
    return_ranks: bool = False,
) -> dict[str, Any]:
    ks = _check_ks(ks)
    rr = cross_modal_ranks(
        sims=sims,
        image_emb=image_emb,
        text_emb=text_emb,
        caption_to_image=caption_to_image,
        scorer=scorer,
        num_images=num_images,
        chunk_size=chunk_size,
        gallery_chunk_size=gallery_chunk_size,
        ties=ties,
    )
    out: dict[str, Any] = {}
    out.update(metrics_from_ranks(rr.i2t, ks, "i2t_"))
    out.update(metrics_from_ranks(rr.t2i, ks, "t2i_"))
    out["rsum"] = float(sum(out[f"i2t_r{k}"] + out[f"t2i_r{k}"] for k in ks))
    if return_ranks:
        out["i2t_ranks"] = rr.i2t
        out["t2i_ranks"] = rr.t2i
    return out
