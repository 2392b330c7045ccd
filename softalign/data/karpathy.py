"""Karpathy-split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``) with an image folder.

Format (Karpathy & Fei-Fei, CVPR 2015, "Deep Visual-Semantic Alignments"; the splits used by VSE++, SCAN,
CUSA)::

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg",
      "split": "train" | "restval" | "val" | "test", "sentences": [{"raw": "A man ..."}, ...]}, ...]}

Flickr30K entries have no ``filepath``. Image paths are ``image_root / filepath / filename``. COCO's ``restval``
images join ``train`` by default (as in VSE++/SCAN: 113,287 training images). Each image keeps its first
``captions_per_image`` sentences (COCO has a few images with 6-7), so caption ``c`` belongs to image
``c // captions_per_image`` whenever every image has at least that many.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from softalign.data.base import RetrievalData
from softalign.io import read_json

SPLITS = ("train", "val", "test", "restval")


def load_karpathy(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str = "train",
    *,
    captions_per_image: int | None = 5,
    restval_in_train: bool = True,
    check_files: bool = True,
    max_images: int | None = None,
) -> RetrievalData:
    """Load one split of a Karpathy JSON as :class:`RetrievalData` (images are file paths).

    Raises FileNotFoundError for a missing JSON or image (naming it), ValueError for an unknown split or an
    entry without sentences.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if split not in SPLITS:
        raise ValueError(f"unknown Karpathy split {split!r}; expected one of {SPLITS}")
    if not json_path.is_file():
        raise FileNotFoundError(f"Karpathy split file not found: {json_path}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_root}")
    meta = read_json(json_path, "Karpathy split file")
    if not isinstance(meta, dict) or not isinstance(meta.get("images"), list):
        raise ValueError(f"{json_path}: expected a JSON object with an 'images' list (Karpathy format)")
    wanted: Sequence[str] = ("train", "restval") if (split == "train" and restval_in_train) else (split,)

    captions: list[str] = []
    images: list[str] = []
    c2i: list[int] = []
    for n, entry in enumerate(meta["images"]):
        if entry.get("split") not in wanted:
            continue
        if "filename" not in entry:
            raise ValueError(f"{json_path}: images[{n}] has no 'filename'")
        sents = [s["raw"] if isinstance(s, dict) else str(s) for s in entry.get("sentences", [])]
        if not sents:
            raise ValueError(f"{json_path}: images[{n}] ({entry['filename']}) has no sentences")
        if captions_per_image is not None:
            if len(sents) < captions_per_image:
                raise ValueError(
                    f"{json_path}: images[{n}] ({entry['filename']}) has {len(sents)} sentences, "
                    f"fewer than captions_per_image={captions_per_image}"
                )
            sents = sents[:captions_per_image]
        path = image_root / entry.get("filepath", "") / entry["filename"]
        if check_files and not path.is_file():
            raise FileNotFoundError(f"{json_path}: image of images[{n}] not found: {path}")
        img_index = len(images)
        images.append(str(path))
        captions.extend(s.strip() for s in sents)
        c2i.extend([img_index] * len(sents))
        if max_images is not None and len(images) >= max_images:
            break
    if not images:
        raise ValueError(f"{json_path}: no images in split {split!r}")
    return RetrievalData(
        captions=captions,
        images=images,
        caption_to_image=c2i,
        name=str(meta.get("dataset", json_path.stem)),
        split=split,
        metadata={"source": str(json_path), "image_root": str(image_root)},
    )
