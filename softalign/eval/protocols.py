"""Standard test protocols for image-text retrieval.

* ``coco1k``: MS-COCO 5K test split (Karpathy), 5 folds of 1,000 consecutive images with their
  captions; metrics are computed per fold and averaged over the 5 folds (every metric, including
  medr/meanr and rsum, is the mean of the per-fold values), as in VSE++ ``evalrank(fold5=True)``.
* ``coco5k``: the full 5,000 images x 25,000 captions.
* ``f30k``: Flickr30K 1K test split (1,000 images, 5,000 captions).
* ``plain``: whatever sizes are given, evaluated at once.
* ``coco``: both ``coco1k`` and ``coco5k``; keys prefixed ``coco1k/`` and ``coco5k/``.

A fold takes images ``[f * 1000, (f + 1) * 1000)`` and every caption whose image is in that range
(with the usual 5 consecutive captions per image this is captions ``[5000 f, 5000 (f + 1))``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from softalign.eval.crossmodal import (
    DEFAULT_GALLERY_CHUNK,
    DEFAULT_KS,
    _as_tensor,
    _plain_recall,
    _take,
    check_caption_to_image,
    cross_modal_ranks,
    recall_curve,
)

PROTOCOLS = {
    # name: (required number of images or None, number of folds)
    "coco1k": (5000, 5),
    "coco5k": (5000, 1),
    "f30k": (1000, 1),
    "plain": (None, 1),
}

__all__ = ["PROTOCOLS", "protocol_metrics", "protocol_recall_curve"]


def _num_images(sims, image_emb, num_images):
    if sims is not None:
        return _as_tensor(sims, "sims").shape[0]
    if image_emb is not None:
        return len(image_emb)
    if num_images is None:
        raise ValueError("scorer over indices: pass num_images")
    return int(num_images)


def _fold_split(c2i_all: torch.Tensor, size: int, n_folds: int):
    """Per fold: first and end image, image indices, caption indices, fold-local caption->image map."""
    for f in range(n_folds):
        i0, i1 = f * size, (f + 1) * size
        caps = torch.nonzero((c2i_all >= i0) & (c2i_all < i1)).flatten()
        yield i0, i1, torch.arange(i0, i1), caps, c2i_all[caps] - i0


def _check_size(protocol: str, n_img: int) -> None:
    need = PROTOCOLS[protocol][0]
    if need is not None and n_img != need:
        raise ValueError(
            f"protocol {protocol!r} expects {need} test images, got {n_img} (use protocol='plain' for other sizes)"
        )


def _fold_metrics(
    n_folds: int,
    *,
    sims=None,
    image_emb=None,
    text_emb=None,
    caption_to_image=None,
    ks: Sequence[int] = DEFAULT_KS,
    scorer: Callable | None = None,
    num_images: int | None = None,
    chunk_size: int | None = 512,
    gallery_chunk_size: int | None = DEFAULT_GALLERY_CHUNK,
    ties: str = "optimistic",
) -> dict[str, Any]:
    """Split the images into ``n_folds`` equal consecutive folds, evaluate each fold, average.

    Returns the mean metrics plus ``"folds"``: the list of per-fold metric dicts."""
    n_img = _num_images(sims, image_emb, num_images)
    if caption_to_image is None:
        raise ValueError("caption_to_image is required")
    c2i_all = _as_tensor(caption_to_image, "caption_to_image").reshape(-1)
    n_txt = c2i_all.numel()
    if sims is not None:
        s_shape = _as_tensor(sims, "sims").shape
        if s_shape[1] != n_txt:
            raise ValueError(f"sims has {s_shape[1]} caption columns but caption_to_image has {n_txt} entries")
    elif text_emb is not None and len(text_emb) != n_txt:
        raise ValueError(f"text_emb has {len(text_emb)} captions but caption_to_image has {n_txt} entries")
    c2i_all = check_caption_to_image(c2i_all, n_txt, n_img)
    if n_folds < 1 or n_img % n_folds != 0:
        raise ValueError(f"cannot split {n_img} images into {n_folds} equal folds")
    size = n_img // n_folds
    kw: dict[str, Any] = dict(ks=ks, chunk_size=chunk_size, gallery_chunk_size=gallery_chunk_size, ties=ties)
    if n_folds == 1:  # no copy of the inputs
        return _plain_recall(
            sims=sims,
            image_emb=image_emb,
            text_emb=text_emb,
            caption_to_image=c2i_all,
            scorer=scorer,
            num_images=num_images,
            **kw,
        )
    folds = []
    for _f, (i0, i1, imgs, caps, c2i) in enumerate(_fold_split(c2i_all, size, n_folds)):
        if sims is not None:
            s = _as_tensor(sims, "sims")
            m = _plain_recall(sims=s[i0:i1].index_select(1, caps.to(s.device)), caption_to_image=c2i, **kw)
        elif scorer is not None and image_emb is None:

            def local(ii, cc, _i0=i0, _caps=caps):
                return scorer(ii + _i0, _caps[cc])

            m = _plain_recall(scorer=local, caption_to_image=c2i, num_images=size, **kw)
        else:
            m = _plain_recall(
                image_emb=_take(image_emb, imgs),
                text_emb=_take(text_emb, caps),
                caption_to_image=c2i,
                scorer=scorer,
                **kw,
            )
        folds.append(m)
    out: dict[str, Any] = {k: float(np.mean([m[k] for m in folds])) for k in folds[0]}
    if n_folds > 1:
        out["folds"] = folds
    return out


def protocol_metrics(protocol: str, **kwargs: Any) -> dict[str, Any]:
    """``cross_modal_recall(..., protocol=...)`` for a named protocol (see the module docstring); keyword inputs as
    :func:`softalign.eval.cross_modal_recall`."""
    if protocol == "coco":
        out: dict[str, Any] = {}
        for p in ("coco1k", "coco5k"):
            m = protocol_metrics(p, **kwargs)
            out.update({f"{p}/{k}": v for k, v in m.items()})
        return out
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS) + ['coco']}")
    n_folds = PROTOCOLS[protocol][1]
    _check_size(protocol, _num_images(kwargs.get("sims"), kwargs.get("image_emb"), kwargs.get("num_images")))
    return _fold_metrics(n_folds, **kwargs)


def protocol_recall_curve(
    protocol: str,
    image_emb: Any,
    text_emb: Any,
    caption_to_image: Any,
    ks: Sequence[int],
    *,
    chunk_size: int | None = 512,
) -> dict[str, Any]:
    """R@K for each K in ``ks`` (percent), measured the way ``protocol`` measures its metrics.

    ``coco1k``: the mean over the 5 folds of 1,000 images of each fold's R@K (the same folds as
    :func:`protocol_metrics`); ``coco5k`` / ``f30k`` / ``plain``: the whole gallery given. Returns
    ``{"k": [...], "i2t": [...], "t2i": [...], "gallery": "<what the curve was measured on>"}``; for
    ``coco`` the curves of both protocols under ``"coco1k/i2t"``, ``"coco1k/t2i"``, ``"coco5k/i2t"`` and
    ``"coco5k/t2i"``. K values larger than the (fold) gallery are dropped.
    """
    if protocol == "coco":
        parts = [
            protocol_recall_curve(p, image_emb, text_emb, caption_to_image, ks, chunk_size=chunk_size)
            for p in ("coco1k", "coco5k")
        ]
        k = [x for x in parts[0]["k"] if x in parts[1]["k"]]
        out: dict[str, Any] = {
            "k": k,
            "gallery": "; ".join(f"{p}/*: {c['gallery']}" for p, c in zip(("coco1k", "coco5k"), parts)),
        }
        for p, c in zip(("coco1k", "coco5k"), parts):
            for d in ("i2t", "t2i"):
                out[f"{p}/{d}"] = [v for x, v in zip(c["k"], c[d]) if x in k]
        return out
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS) + ['coco']}")
    n_img = len(image_emb)
    _check_size(protocol, n_img)
    n_folds = PROTOCOLS[protocol][1]
    c2i_all = check_caption_to_image(
        _as_tensor(caption_to_image, "caption_to_image").reshape(-1), len(text_emb), n_img
    )
    if n_img % n_folds:
        raise ValueError(f"cannot split {n_img} images into {n_folds} equal folds")
    size = n_img // n_folds
    curves = []
    k_max = n_img + len(text_emb)
    for _, _, imgs, caps, c2i in _fold_split(c2i_all, size, n_folds):
        rr = cross_modal_ranks(
            image_emb=_take(image_emb, imgs),
            text_emb=_take(text_emb, caps),
            caption_to_image=c2i,
            chunk_size=chunk_size,
        )
        k_max = min(k_max, max(size, caps.numel()))
        curves.append((rr.i2t, rr.t2i))
    kept = [k for k in ks if k <= k_max]
    i2t = np.mean([recall_curve(a, kept) for a, _ in curves], axis=0).tolist() if kept else []
    t2i = np.mean([recall_curve(b, kept) for _, b in curves], axis=0).tolist() if kept else []
    gallery = (
        f"mean over {n_folds} folds of {size} images ({protocol})"
        if n_folds > 1
        else f"all {n_img} images x {len(text_emb)} captions ({protocol})"
    )
    return {"k": kept, "i2t": i2t, "t2i": t2i, "gallery": gallery}
