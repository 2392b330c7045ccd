"""The one entry point of cross-modal evaluation: :func:`cross_modal_recall` dispatches to the plain recall of
:mod:`softalign.eval.crossmodal` or to a test protocol of :mod:`softalign.eval.protocols` (one way: neither of them
imports this module)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from softalign.eval.crossmodal import DEFAULT_GALLERY_CHUNK, DEFAULT_KS, _plain_recall
from softalign.eval.protocols import protocol_metrics

__all__ = ["cross_modal_recall"]


def cross_modal_recall(
    *,
    sims: Any | None = None,
    image_emb: Any | None = None,
    text_emb: Any | None = None,
    caption_to_image: Any | None = None,
    protocol: str = "plain",
    ks: Sequence[int] = DEFAULT_KS,
    scorer: Callable | None = None,
    num_images: int | None = None,
    chunk_size: int | None = 512,
    gallery_chunk_size: int | None = DEFAULT_GALLERY_CHUNK,
    ties: str = "optimistic",
    return_ranks: bool = False,
) -> dict[str, Any]:
    """i2t and t2i R@K, medr, meanr and rsum (VSE++ definitions; see the module docstring): the one entry point of
    cross-modal evaluation.

    Inputs, by name: ``sims`` ``[N_images, N_captions]``; or ``image_emb`` ``[Ni, D]`` + ``text_emb`` ``[Nt, D]``
    (dot products: normalise first for cosine); or ``scorer`` (see :func:`cross_modal_ranks`), plus
    ``caption_to_image`` (LongTensor ``[N_captions]``, any number of captions per image).

    ``protocol``: ``"plain"`` (the inputs as given), ``"coco1k"`` (mean over 5 folds of 1,000 images), ``"coco5k"``,
    ``"coco"`` (both, keys prefixed ``coco1k/`` and ``coco5k/``) or ``"f30k"`` (:mod:`softalign.eval.protocols`).

    Returns ``{"i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "t2i_r1", ..., "rsum"}`` (one ``r{K}`` per K
    in ``ks``); with ``return_ranks=True`` (plain protocol) also ``"i2t_ranks"`` / ``"t2i_ranks"`` (0-based). Scores
    are computed in tiles of ``chunk_size`` images x ``gallery_chunk_size`` captions, so memory is bounded by
    default whatever the gallery size.
    """
    kw = dict(
        sims=sims,
        image_emb=image_emb,
        text_emb=text_emb,
        caption_to_image=caption_to_image,
        ks=ks,
        scorer=scorer,
        num_images=num_images,
        chunk_size=chunk_size,
        gallery_chunk_size=gallery_chunk_size,
        ties=ties,
    )
    if protocol != "plain":
        if return_ranks:
            raise ValueError(f"return_ranks needs protocol='plain' (protocol {protocol!r} averages folds)")
        return protocol_metrics(protocol, **kw)
    return _plain_recall(**kw, return_ranks=return_ranks)
