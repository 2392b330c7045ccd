"""False-negative-aware COCO 5K metrics: ECCV Caption and CxC extended positives.

COCO's five captions per image miss many valid matches, which is the problem CUSA's soft labels target. Two
annotation sets add positives for the Karpathy 5K test split:

* **ECCV Caption** (Chun et al., "ECCV Caption: Correcting False Negatives by Collecting Machine-and-Human-verified
  Image-Caption Associations for MS-COCO", ECCV 2022): human-verified positives for 1,261 image queries and 1,332
  caption queries. Metrics: mAP@R (``AP@R = 1/R sum_{r<=R} P@r * [item r is positive]``, R = the query's number of
  positives), R-Precision (``P@R``) and R@1.
* **CxC** (Parekh et al., "Crisscrossed Captions: Extended Intramodal and Intermodal Semantic Similarity
  Judgments for MS-COCO", EACL 2021): R@1/5/10 with the original and the CxC-added positives.

The annotations come from the PyPI package ``eccv-caption`` (``eccv_caption/data/*.json``), read offline; the
metrics are computed here in tiles (a test checks them against the package's own ``Metrics`` code). PMRP needs the
plausible-match annotations (over 140 MB, downloaded separately), which the package does not ship: not offered.

**Row order.** Caption row ``i`` of the embeddings is COCO caption (annotation) id ``coco_test_ids.npy[i]``: the
Karpathy 5K test split, 25,000 captions, five consecutive captions per image; image row ``j`` is the COCO image of
captions ``5j .. 5j+4``. Embeddings in another order pass ``caption_ids`` (the COCO caption id of each text row)
and ``image_ids`` (the COCO image id of each image row). A ``caption_to_image`` that disagrees with COCO's own
caption -> image map under that order is refused, naming the first caption row at fault.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = ["POSITIVE_SETS", "coco5k_test_ids", "extended_positive_metrics"]

POSITIVE_SETS = ("eccv", "cxc", "original")


def _data_dir() -> Path:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the package warns when ujson is missing
            import eccv_caption
    except ImportError:
        raise ImportError(
            "ECCV Caption / CxC positives need the eccv-caption package: pip install "
            "'softalign[eval]' (or pip install eccv-caption)"
        ) from None
    return Path(eccv_caption.__file__).resolve().parent / "data"


@lru_cache(maxsize=8)
def _read_map(name: str) -> dict[int, tuple[int, ...]]:
    with open(_data_dir() / f"{name}.json", encoding="utf-8") as f:
        raw = json.load(f)
    return {int(k): tuple(int(x) for x in v) for k, v in raw.items()}


def coco5k_test_ids() -> tuple[np.ndarray, np.ndarray]:
    """``(caption_ids [25000], image_ids [5000])``: the COCO ids of the Karpathy 5K test split in row order."""
    caption_ids = np.load(_data_dir() / "coco_test_ids.npy").astype(np.int64)
    c2i = _read_map("original_caption_to_image")
    image_ids = np.array([c2i[int(c)][0] for c in caption_ids[::5]], dtype=np.int64)
    return caption_ids, image_ids


def _check_ids(caption_ids, image_ids, caption_to_image, n_img: int, n_txt: int):
    ref_caps, ref_imgs = coco5k_test_ids()
    if caption_ids is None and image_ids is None:
        if (n_img, n_txt) != (len(ref_imgs), len(ref_caps)):
            raise ValueError(
                f"ECCV Caption / CxC positives are for the COCO 5K test split: 5000 images x 25000 captions in the "
                f"Karpathy order; got {n_img} images x {n_txt} captions (pass caption_ids / image_ids, the COCO ids "
                "of each row, for another order)"
            )
        caption_ids, image_ids = ref_caps, ref_imgs
    elif caption_ids is None or image_ids is None:
        raise ValueError("pass both caption_ids and image_ids (the COCO ids of each text / image row), or neither")
    caption_ids = np.asarray(caption_ids, dtype=np.int64).ravel()
    image_ids = np.asarray(image_ids, dtype=np.int64).ravel()
    for what, ids, ref, n in (
        ("caption_ids", caption_ids, ref_caps, n_txt),
        ("image_ids", image_ids, ref_imgs, n_img),
    ):
        if len(ids) != n:
            raise ValueError(f"{what} has {len(ids)} entries for {n} rows")
        unknown = np.flatnonzero(~np.isin(ids, ref))
        if unknown.size:
            raise ValueError(f"{what}[{unknown[0]}] = {ids[unknown[0]]} is not in the COCO 5K test split")
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"{what} repeats an id: each COCO id must name one row")
    if caption_to_image is not None:
        c2i = np.asarray(caption_to_image, dtype=np.int64).ravel()
        coco = _read_map("original_caption_to_image")
        truth = np.array([coco[int(c)][0] for c in caption_ids], dtype=np.int64)
        if len(c2i) != len(caption_ids):
            raise ValueError(f"caption_to_image has {len(c2i)} entries for {len(caption_ids)} captions")
        given = image_ids[c2i]
        bad = np.flatnonzero(given != truth)
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"caption row {i} (COCO caption {caption_ids[i]}) belongs to COCO image {truth[i]}, but "
                f"caption_to_image puts it with image row {c2i[i]} (COCO image {given[i]}): the embeddings are not "
                "in the Karpathy 5K test order; pass caption_ids / image_ids for their order"
            )
    return caption_ids, image_ids


def _top_rows(scores_fn, n_rows: int, k: int, chunk: int) -> torch.Tensor:
    out = []
    for s in range(0, n_rows, chunk):
        block = scores_fn(s, min(n_rows, s + chunk))
        out.append(block.topk(min(k, block.shape[1]), dim=1).indices)
    return torch.cat(out)


def _ranked_metrics(
    top: np.ndarray, query_rows: np.ndarray, positives: list[np.ndarray], ks: Sequence[int], eccv: bool
) -> dict[str, float]:
    """``top [Nq_all, k]`` ranked item rows; ``query_rows``: the annotated queries; ``positives[q]`` item rows."""
    t = top[query_rows]
    n_pos = np.array([len(p) for p in positives])  # a positive outside the embeddings (row -1) counts in R
    q_index = np.repeat(np.arange(len(positives)), n_pos)
    rows = np.concatenate(positives).astype(np.int64)
    # (query, item) pairs as one int64 key each: a hit is a ranked pair among the positive pairs
    width = int(max(top.max(initial=0), rows.max(initial=0))) + 1
    pos_keys = (q_index.astype(np.int64) * width + rows)[rows >= 0]
    hits = np.isin(np.arange(len(positives))[:, None].astype(np.int64) * width + t, pos_keys)
    out = {f"r{k}": 100.0 * float(hits[:, :k].any(1).mean()) for k in ks}
    if eccv:
        cum = np.cumsum(hits, 1)
        rank = np.arange(1, hits.shape[1] + 1)
        within = rank[None, :] <= n_pos[:, None]
        prec = cum / rank[None, :]
        out["map_at_r"] = 100.0 * float(((prec * hits * within).sum(1) / n_pos).mean())
        out["r_precision"] = 100.0 * float((cum[np.arange(len(n_pos)), n_pos - 1] / n_pos).mean())
    return out


def extended_positive_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    positives: Sequence[str] = ("eccv", "cxc"),
    ks: Sequence[int] = (1, 5, 10),
    caption_ids=None,
    image_ids=None,
    caption_to_image=None,
    chunk_size: int = 512,
    normalize: bool = True,
) -> dict[str, float]:
    """COCO 5K i2t / t2i metrics with extended positives (see the module docstring), in percent.

    Keys: ``eccv_{i2t,t2i}_{map_at_r,r_precision,r1}``, ``cxc_{i2t,t2i}_r{K}`` and ``original_{i2t,t2i}_r{K}``
    (COCO's own five captions, for comparison) for the sets named in ``positives``."""
    unknown = [p for p in positives if p not in POSITIVE_SETS]
    if unknown or not positives:
        raise ValueError(f"positives must name some of {', '.join(POSITIVE_SETS)}; got {list(positives)}")
    img = torch.as_tensor(image_emb).float()
    txt = torch.as_tensor(text_emb).float()
    if img.dim() != 2 or txt.dim() != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"image and text embeddings must be [N, D] with one D; got {tuple(img.shape)} and {tuple(txt.shape)}"
        )
    caps, imgs = _check_ids(caption_ids, image_ids, caption_to_image, img.shape[0], txt.shape[0])
    if normalize:
        img, txt = torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1)
    cap_row = {int(c): i for i, c in enumerate(caps)}
    img_row = {int(c): i for i, c in enumerate(imgs)}
    gts = {p: (_read_map(f"{p}_image_to_caption"), _read_map(f"{p}_caption_to_image")) for p in positives}
    depth_i2t = max([*ks, *(max(len(v) for v in g[0].values()) for g in gts.values())])
    depth_t2i = max([*ks, *(max(len(v) for v in g[1].values()) for g in gts.values())])
    top_i2t = _top_rows(lambda a, b: img[a:b] @ txt.t(), img.shape[0], depth_i2t, chunk_size).numpy()
    top_t2i = _top_rows(lambda a, b: txt[a:b] @ img.t(), txt.shape[0], depth_t2i, 8 * chunk_size).numpy()
    out: dict[str, float] = {}
    for p, (i2c, c2i) in gts.items():
        for direction, gt, top, q_row, item_row in (
            ("i2t", i2c, top_i2t, img_row, cap_row),
            ("t2i", c2i, top_t2i, cap_row, img_row),
        ):
            queries = np.array([q_row[q] for q in gt], dtype=np.int64)
            # a few annotated positives are not in the 5K split (never retrieved, still counted in R, as the
            # package counts them)
            pos = [np.array([item_row.get(x, -1) for x in gt[q]], dtype=np.int64) for q in gt]
            m = _ranked_metrics(top, queries, pos, ks if p != "eccv" else (1,), eccv=p == "eccv")
            out.update({f"{p}_{direction}_{k}": v for k, v in m.items()})
    return out
