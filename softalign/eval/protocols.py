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

from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from softalign.eval.crossmodal import (
    DEFAULT_KS,
    _as_tensor,
    _take,
    check_caption_to_image,
    cross_modal_recall,
)

PROTOCOLS = {
    # name: (required number of images or None, number of folds)
    "coco1k": (5000, 5),
    "coco5k": (5000, 1),
    "f30k": (1000, 1),
    "plain": (None, 1),
}

__all__ = ["PROTOCOLS", "evaluate_coco", "evaluate_protocol", "fold_metrics"]


def _num_images(sims, image_emb, num_images):
    if sims is not None:
        return _as_tensor(sims, "sims").shape[0]
    if image_emb is not None:
        return len(image_emb)
    if num_images is None:
        raise ValueError("scorer over indices: pass num_images")
    return int(num_images)


def fold_metrics(
    n_folds: int,
    sims: Optional[Any] = None,
    image_emb: Optional[Any] = None,
    text_emb: Optional[Any] = None,
    caption_to_image: Optional[Any] = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    scorer: Optional[Callable] = None,
    num_images: Optional[int] = None,
    chunk_size: Optional[int] = 512,
    gallery_chunk_size: Optional[int] = None,
    ties: str = "optimistic",
) -> Dict[str, Any]:
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
    kw = dict(ks=ks, chunk_size=chunk_size, gallery_chunk_size=gallery_chunk_size, ties=ties)
    if n_folds == 1:  # no copy of the inputs
        return cross_modal_recall(sims, image_emb, text_emb, c2i_all, scorer=scorer, num_images=num_images, **kw)
    folds = []
    for f in range(n_folds):
        i0, i1 = f * size, (f + 1) * size
        caps = torch.nonzero((c2i_all >= i0) & (c2i_all < i1)).flatten()
        imgs = torch.arange(i0, i1)
        c2i = c2i_all[caps] - i0
        if sims is not None:
            s = _as_tensor(sims, "sims")
            m = cross_modal_recall(sims=s[i0:i1].index_select(1, caps.to(s.device)), caption_to_image=c2i, **kw)
        elif scorer is not None and image_emb is None:
            def local(ii, cc, _i0=i0, _caps=caps):
                return scorer(ii + _i0, _caps[cc])

            m = cross_modal_recall(scorer=local, caption_to_image=c2i, num_images=size, **kw)
        else:
            m = cross_modal_recall(
                image_emb=_take(image_emb, imgs),
                text_emb=_take(text_emb, caps),
                caption_to_image=c2i,
                scorer=scorer,
                **kw,
            )
        folds.append(m)
    out: Dict[str, Any] = {k: float(np.mean([m[k] for m in folds])) for k in folds[0]}
    if n_folds > 1:
        out["folds"] = folds
    return out


def evaluate_protocol(
    protocol: str = "plain",
    sims: Optional[Any] = None,
    image_emb: Optional[Any] = None,
    text_emb: Optional[Any] = None,
    caption_to_image: Optional[Any] = None,
    **kwargs: Any,
) -> Dict[str, Any]:
    """Evaluate under a named protocol (see module docstring). kwargs go to :func:`fold_metrics`."""
    if protocol == "coco":
        out: Dict[str, Any] = {}
        for p in ("coco1k", "coco5k"):
            m = evaluate_protocol(p, sims, image_emb, text_emb, caption_to_image, **kwargs)
            out.update({f"{p}/{k}": v for k, v in m.items()})
        return out
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS) + ['coco']}")
    need, n_folds = PROTOCOLS[protocol]
    n_img = _num_images(sims, image_emb, kwargs.get("num_images"))
    if need is not None and n_img != need:
        raise ValueError(
            f"protocol {protocol!r} expects {need} test images, got {n_img} "
            "(use protocol='plain' for other sizes)"
        )
    return fold_metrics(n_folds, sims, image_emb, text_emb, caption_to_image, **kwargs)


def evaluate_coco(
    image_emb: Optional[Any] = None,
    text_emb: Optional[Any] = None,
    caption_to_image: Optional[Any] = None,
    protocol: str = "coco5k",
    *,
    sims: Optional[Any] = None,
    **kwargs: Any,
) -> Dict[str, Any]:
    """COCO / Flickr30K evaluation: ``protocol`` in ``coco1k`` (5-fold mean), ``coco5k``,
    ``coco`` (both), ``f30k`` or ``plain``. Keyword arguments (``ks``, ``scorer``, ``chunk_size``,
    ``gallery_chunk_size``, ``num_images``, ``ties``) go to :func:`cross_modal_recall`."""
    return evaluate_protocol(protocol, sims, image_emb, text_emb, caption_to_image, **kwargs)
