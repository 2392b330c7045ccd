"""SCAN / VSE++ precomputed features: ``{split}_ims.npy`` + ``{split}_caps.txt``.

Layout of the ``data/{coco,f30k}_precomp`` folders of Lee et al., "Stacked Cross Attention for Image-Text
Matching" (ECCV 2018) and Faghri et al., VSE++ (BMVC 2018): ``{split}_ims.npy`` holds one feature array per
image (``[N, 36, 2048]`` bottom-up regions or ``[N, 2048]`` / ``[N, 4096]`` global features) and
``{split}_caps.txt`` one caption per line, ``captions_per_image`` (5) consecutive lines per image, so
``image = caption_index // captions_per_image``. (SCAN's ``dev`` split on COCO stores one 5-caption block per
image; a few releases repeat the image rows 5 times -- detected and folded back here.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from softalign.data.base import RetrievalData


def load_precomp(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    captions_per_image: int = 5,
    mmap: bool = True,
    max_images: int | None = None,
) -> RetrievalData:
    """Load ``{split}_ims.npy`` (memory-mapped) and ``{split}_caps.txt`` as :class:`RetrievalData`.

    ``images`` is the feature array (rows = images). Raises FileNotFoundError naming a missing file and
    ValueError when the caption count does not match ``captions_per_image`` x images.
    """
    data_dir = Path(data_dir)
    ims_path, caps_path = data_dir / f"{split}_ims.npy", data_dir / f"{split}_caps.txt"
    for p in (ims_path, caps_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"precomputed-feature file not found: {p} (expected {split}_ims.npy and "
                f"{split}_caps.txt in {data_dir})"
            )
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    feats = np.load(ims_path, mmap_mode="r" if mmap else None)
    with open(caps_path, encoding="utf-8") as f:
        captions = [line.rstrip("\n").strip() for line in f]
    while captions and captions[-1] == "":
        captions.pop()
    n_img, n_cap = feats.shape[0], len(captions)
    if n_img == n_cap and captions_per_image > 1:  # image rows repeated once per caption
        feats = feats[::captions_per_image]
        n_img = feats.shape[0]
    if n_cap != n_img * captions_per_image:
        raise ValueError(
            f"{caps_path} has {n_cap} captions but {ims_path} has {n_img} images; expected "
            f"{captions_per_image} captions per image ({n_img * captions_per_image} lines)"
        )
    if max_images is not None:
        n_img = min(n_img, int(max_images))
        feats, captions = feats[:n_img], captions[: n_img * captions_per_image]
    c2i = np.arange(len(captions), dtype=np.int64) // captions_per_image
    return RetrievalData(
        captions=captions,
        images=feats,
        caption_to_image=c2i,
        name=data_dir.name,
        split=split,
        metadata={"source": str(data_dir), "feature_shape": list(feats.shape[1:])},
    )
