"""Calibrated soft-label temperature: pick ``tau_s`` per teacher matrix for a target soft-label sharpness.

CUSA [Huang et al., AAAI 2024, Eq. 3-6] turns the teacher's similarities of a batch into soft labels
``P = softmax(T / tau_s)`` with a fixed ``tau_s = 1.0``. Teacher cosines of a batch usually lie within a few
tenths of each other, so at ``tau_s = 1`` the rows of ``P`` are almost uniform (normalised entropy near 1): the
"soft labels" then carry next to no information about which pairs the teacher finds similar. How sharp ``P`` is
depends on the teacher's own similarity spread and on the batch size, so no fixed value suits every teacher.

:func:`calibrate_temperature` chooses ``tau_s`` for a matrix so that the mean normalised row entropy

    ``H(tau) = 1/B sum_i [ -sum_j P_ij log P_ij ] / log B``,   ``P = softmax(T / tau)`` row-wise,

equals a target (``DEFAULT_SOFT_LABEL_ENTROPY``) on batches of the training batch size. ``H`` rises monotonically
with ``tau`` (from 0 at ``tau -> 0`` with distinct row maxima, to 1 at ``tau -> inf``), so bisection on
``log tau`` finds it. It is computed once, from random training-size batches of the cache (:func:`cache_batches`),
never per step (:meth:`softalign.losses.SoftAlignLoss.calibrate`).

:func:`soft_label_stats` reports what a ``tau_s`` does to a batch: the normalised entropy, the mass ``P_ii`` on
the pair itself, and with labels the share of the off-diagonal mass on same-label items next to its chance level.
"""

from __future__ import annotations

import math

import torch

#: Target normalised soft-label entropy (H / log B) of the calibrated ``tau_s``. Chosen on the demo's validation
#: split (cut from training; 3 seeds; docs/losses.md "Soft-label temperature"): 0.8 was best or within 1.5 rsum of the best
#: of {0.3, 0.5, 0.7, 0.8, 0.9, 0.95} for each base loss. CUSA's fixed tau_s = 1.0 gives about 0.99.
DEFAULT_SOFT_LABEL_ENTROPY = 0.8

__all__ = [
    "DEFAULT_SOFT_LABEL_ENTROPY",
    "normalized_entropy",
    "soft_label_stats",
    "calibrate_temperature",
    "sample_batch_ids",
    "teacher_batches",
    "cache_batches",
]


def _as_batches(sims) -> torch.Tensor:
    """``[B, B]``, ``[N, B, B]`` or a list of ``[B, B]`` (equal B) -> float64 ``[N, B, B]``, checked."""
    if isinstance(sims, torch.Tensor):
        x = sims
    else:
        sims = list(sims)
        if not sims:
            raise ValueError("no teacher similarity batches given")
        x = torch.stack([torch.as_tensor(s) for s in sims])
    x = x.detach().to("cpu", torch.float64)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"teacher similarities must be [B, B] or [N, B, B], got shape {tuple(x.shape)}")
    if x.shape[1] < 2:
        raise ValueError(f"a soft-label batch needs B >= 2 items, got B = {x.shape[1]}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"teacher similarities contain non-finite values (first at index {tuple(bad)})")
    return x


def normalized_entropy(sims, tau: float) -> float:
    """Mean over rows (and batches) of ``H(softmax(T / tau)) / log B``."""
    x = _as_batches(sims)
    return _entropy(x, float(tau))


def _entropy(x: torch.Tensor, tau: float) -> float:
    logp = torch.log_softmax(x / tau, dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    return float(h.mean() / math.log(x.shape[-1]))


def soft_label_stats(sims, tau: float, labels: torch.Tensor | None = None) -> dict[str, float]:
    """What ``P = softmax(T / tau)`` looks like on teacher batches ``sims`` (``[B, B]`` or ``[N, B, B]``).

    Returns ``entropy`` (mean ``H / log B``), ``diagonal_mass`` (mean ``P_ii``; uniform rows give ``1 / B``) and,
    with ``labels`` (``[B]`` or ``[N, B]`` ints, one per item), ``same_label_mass`` (mean share of the
    off-diagonal mass ``sum_{j != i} P_ij`` that falls on items with ``i``'s label) and ``same_label_chance``
    (the share uniform rows would give: the fraction of the other items that share ``i``'s label).
    """
    x = _as_batches(sims)
    n, b, _ = x.shape
    tau = float(tau)
    if not tau > 0 or not math.isfinite(tau):
        raise ValueError(f"tau must be finite and > 0, got {tau}")
    p = torch.softmax(x / tau, dim=-1)
    eye = torch.eye(b, dtype=torch.bool)
    out = {
        "tau": tau,
        "batch_size": b,
        "entropy": _entropy(x, tau),
        "diagonal_mass": float(p.diagonal(dim1=1, dim2=2).mean()),
    }
    if labels is not None:
        lab = torch.as_tensor(labels)
        if lab.dim() == 1:
            lab = lab.unsqueeze(0).expand(n, -1)
        if lab.shape != (n, b):
            raise ValueError(f"labels must be [{b}] or [{n}, {b}] (one per item), got shape {tuple(lab.shape)}")
        same = (lab.unsqueeze(2) == lab.unsqueeze(1)) & ~eye
        off = p.masked_fill(eye, 0.0).sum(-1).clamp_min(1e-300)
        out["same_label_mass"] = float(((p * same).sum(-1) / off).mean())
        out["same_label_chance"] = float((same.sum(-1).double() / (b - 1)).mean())
    return out


def calibrate_temperature(
    sims,
    target_entropy: float = DEFAULT_SOFT_LABEL_ENTROPY,
    low: float = 1e-4,
    high: float = 1e3,
    iterations: int = 80,
) -> float:
    """The ``tau`` at which the mean normalised soft-label entropy of ``sims`` equals ``target_entropy``.

    Bisection on ``log tau`` in ``[low, high]`` (``H`` is monotone in ``tau``). A target the teacher cannot reach
    inside that range (e.g. all rows identical) raises a ValueError naming the entropies at both ends.
    """
    target = float(target_entropy)
    if not 0.0 < target < 1.0:
        raise ValueError(f"target_entropy must lie in (0, 1) (a fraction of log B), got {target_entropy}")
    x = _as_batches(sims)
    lo, hi = math.log(low), math.log(high)
    h_lo, h_hi = _entropy(x, low), _entropy(x, high)
    if not h_lo <= target <= h_hi:
        raise ValueError(
            f"soft-label entropy {target} is not reachable for these teacher similarities: it ranges "
            f"from {h_lo:.4f} (tau={low:g}) to {h_hi:.4f} (tau={high:g}); are the teacher rows constant?"
        )
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if _entropy(x, math.exp(mid)) < target:
            lo = mid
        else:
            hi = mid
    return float(math.exp((lo + hi) / 2))


def sample_batch_ids(
    num_captions: int, batch_size: int, num_batches: int, seed: int = 0, caption_to_image: torch.Tensor | None = None
) -> torch.Tensor:
    """``[num_batches, batch_size]`` caption ids drawn as a trainer would: without replacement within a batch.
    With ``caption_to_image`` each batch holds one caption each of ``batch_size`` distinct images (sampling by
    images, as CUSA's and the demo's loaders do), else ``batch_size`` distinct captions."""
    g = torch.Generator().manual_seed(int(seed))
    if caption_to_image is None:
        if batch_size > num_captions:
            raise ValueError(f"batch_size {batch_size} exceeds the {num_captions} captions of the cache")
        return torch.stack([torch.randperm(num_captions, generator=g)[:batch_size] for _ in range(num_batches)])
    c2i = torch.as_tensor(caption_to_image).long().cpu()
    num_images = int(c2i.max()) + 1 if c2i.numel() else 0
    if batch_size > num_images:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_images} images of the cache")
    order = torch.argsort(c2i, stable=True)
    counts = torch.bincount(c2i, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    out = []
    for _ in range(num_batches):
        imgs = torch.randperm(num_images, generator=g)[:batch_size]
        pick = (torch.rand(batch_size, generator=g) * counts[imgs]).long()
        out.append(order[starts[imgs] + pick])
    return torch.stack(out)


def teacher_batches(cache, batch_ids: torch.Tensor):
    """``(image_sims [N, B, B], text_sims [N, B, B])`` of the cache's teachers for each row of ``batch_ids``."""
    img, txt = [], []
    for ids in batch_ids:
        _, image, text = cache.lookup(ids, device="cpu")  # unit teacher embeddings of the batch
        img.append((image @ image.T).float())
        txt.append((text @ text.T).float())
    return torch.stack(img), torch.stack(txt)


def cache_batches(cache, batch_size: int, num_batches: int = 16, seed: int = 0):
    """``(ids [N, B], image_sims [N, B, B], text_sims [N, B, B])``: ``num_batches`` random training-size batches of
    the cache and their teacher matrices. One caption per image (as CUSA's and the demo's loaders sample) when the
    cache has at least ``batch_size`` images, else distinct captions; ``B = min(batch_size, captions)``."""
    batch_size = int(batch_size)
    if batch_size < 2:
        raise ValueError(
            f"batch_size must be >= 2 to calibrate soft labels, got {batch_size}: a batch of one pair has "
            "a 1 x 1 soft label. Calibrate once on the training batch size (loss.calibrate(cache, "
            "batch_size=B) before the first step), or fix the soft-label temperature "
            "(teacher_temperature=1.0, CUSA's)"
        )
    if int(num_batches) < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    c2i = torch.as_tensor(cache.caption_to_image).long().cpu()
    by_images = c2i.numel() > 0 and batch_size <= int(c2i.max()) + 1
    ids = sample_batch_ids(
        cache.num_captions, min(batch_size, cache.num_captions), int(num_batches), seed, c2i if by_images else None
    )
    return (ids, *teacher_batches(cache, ids))
