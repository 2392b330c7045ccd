"""Cross-modal R@K through faiss (``pip install faiss-cpu``): exact inner-product top-K search.

The tiled :func:`~softalign.eval.recall.cross_modal_recall` already bounds memory for any gallery, and gives
the full rank of every positive (medr, meanr). This path gives **R@K only**, from ``faiss.IndexFlatIP`` (exact,
not approximate) top-``max(ks)`` searches, and is what a user with a faiss index on a GPU, or with 1M+ captions,
would run. The R@K are the same as ``cross_modal_recall``'s (a test checks it), except where a positive ties
exactly with another item at the K-th place: ``cross_modal_recall`` gives ties to the positive, faiss orders them
arbitrarily.

``i2t R@K``: an image's query hits when any of its captions is among its K nearest captions; ``t2i R@K``: a
caption's query hits when its image is among its K nearest images (VSE++ definitions, Faghri et al., BMVC 2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["faiss_recall_at_k"]


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("the faiss recall path needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def _search(faiss, gallery: np.ndarray, queries: np.ndarray, k: int, batch: int) -> np.ndarray:
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    out = [index.search(queries[s : s + batch], k)[1] for s in range(0, len(queries), batch)]
    return np.concatenate(out)


def faiss_recall_at_k(
    image_emb, text_emb, caption_to_image, ks: Sequence[int] = (1, 5, 10), query_batch: int = 4096
) -> dict[str, float]:
    """``{"i2t_r{K}", "t2i_r{K}", "rsum"}`` in percent from exact faiss searches (inner products: normalise the
    embeddings first for cosine)."""
    from softalign.eval.crossmodal import check_caption_to_image

    faiss = _import_faiss()
    img = np.ascontiguousarray(torch.as_tensor(image_emb).detach().float().cpu().numpy())
    txt = np.ascontiguousarray(torch.as_tensor(text_emb).detach().float().cpu().numpy())
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"image and text embeddings must be [N, D] with one D; got {img.shape} and {txt.shape}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive recall cut-offs, got {list(ks)}")
    c2i = check_caption_to_image(caption_to_image, txt.shape[0], img.shape[0]).numpy()
    k = max(ks)
    top_caps = _search(faiss, txt, img, min(k, txt.shape[0]), query_batch)  # [Ni, k] caption rows
    top_imgs = _search(faiss, img, txt, min(k, img.shape[0]), query_batch)  # [Nt, k] image rows
    i2t_hit = c2i[top_caps] == np.arange(img.shape[0])[:, None]
    t2i_hit = top_imgs == c2i[:, None]
    out = {}
    for name, hit in (("i2t", i2t_hit), ("t2i", t2i_hit)):
        for kk in ks:
            out[f"{name}_r{kk}"] = 100.0 * float(hit[:, :kk].any(1).mean())
    out["rsum"] = sum(out[f"{d}_r{kk}"] for d in ("i2t", "t2i") for kk in ks)
    return out
