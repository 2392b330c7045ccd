"""TERAN's training split in TERAN's own caption order: what a teacher cache for mesnico/TERAN must be built over.

TERAN (Messina et al., ACM TOMM 2021) numbers its training captions itself (``data.py``; ``ids`` in a batch are
these numbers), so a cache for it must list the captions in exactly that order:

* **COCO** (``dataset.name: coco``): ``DATA/coco/annotations/coco_train_ids.npy`` (+ ``coco_restval_ids.npy`` when
  ``dataset.restval: True``, its default) holds COCO *annotation* ids. Caption ``i`` is annotation ``ids[i]`` of
  ``captions_train2014.json`` for the train part and of ``captions_val2014.json`` for the restval part; its image
  is that annotation's ``image_id``, the file ``IMAGES/train2014/<file_name>`` or ``IMAGES/val2014/<file_name>``.
  Annotations are not grouped by image, which is why ``ids // 5`` is wrong for TERAN on COCO.
* **Flickr30k** (``f30k``): ``DATA/f30k/annotations/dataset_flickr30k.json`` (Karpathy's); for each image of
  split ``train`` in file order, one caption per sentence (``sentences[k]["raw"]``), image ``IMAGES/<filename>``.

:func:`teran_training_split` returns captions, image paths and the caption->image map (images numbered by first
appearance); ``softalign cache build-teran`` builds the cache from them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from softalign.io import read_json

PathLike = str | os.PathLike


def _ids(path: Path) -> list[int]:
    if not path.is_file():
        raise FileNotFoundError(f"TERAN id file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: not a plain .npy array of annotation ids ({err})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: expected a 1-D integer array of COCO annotation ids, got {arr.dtype} {arr.shape}")
    return arr.tolist()


def _coco(data_dir: Path, images_path: Path, restval: bool) -> tuple[list[str], list[str], list[int]]:
    ann_dir = data_dir / "coco" / "annotations"
    parts = [("captions_train2014.json", "coco_train_ids.npy", "train2014")]
    if restval:
        parts.append(("captions_val2014.json", "coco_restval_ids.npy", "val2014"))
    captions: list[str] = []
    images: list[str] = []
    c2i: list[int] = []
    index: dict[tuple[str, int], int] = {}
    for ann_file, ids_file, img_dir in parts:
        coco = read_json(ann_dir / ann_file, "TERAN annotation file")
        anns = {a["id"]: a for a in coco.get("annotations", [])}
        files = {im["id"]: im["file_name"] for im in coco.get("images", [])}
        for pos, ann_id in enumerate(_ids(ann_dir / ids_file)):
            ann = anns.get(ann_id)
            if ann is None:
                raise KeyError(f"{ids_file}[{pos}] = annotation {ann_id}, which {ann_file} does not hold")
            image_id = ann["image_id"]
            if image_id not in files:
                raise KeyError(f"annotation {ann_id} of {ann_file} names image {image_id}, which it does not list")
            key = (img_dir, image_id)
            if key not in index:
                index[key] = len(images)
                images.append(str(images_path / img_dir / files[image_id]))
            captions.append(str(ann["caption"]).strip())
            c2i.append(index[key])
    return captions, images, c2i


def _f30k(data_dir: Path, images_path: Path) -> tuple[list[str], list[str], list[int]]:
    path = data_dir / "f30k" / "annotations" / "dataset_flickr30k.json"
    entries = read_json(path, "TERAN annotation file").get("images", [])
    captions: list[str] = []
    images: list[str] = []
    c2i: list[int] = []
    for j, entry in enumerate(entries):
        if entry.get("split") != "train":
            continue
        sentences = entry.get("sentences") or []
        if not sentences:
            raise ValueError(f"{path}: image {j} ({entry.get('filename')}) has no sentences")
        images.append(str(images_path / entry["filename"]))
        for sent in sentences:
            captions.append(str(sent["raw"]).strip())
            c2i.append(len(images) - 1)
    if not images:
        raise ValueError(f"{path}: no image has split 'train'")
    return captions, images, c2i


def teran_training_split(
    data_dir: PathLike, dataset: str, images_path: PathLike, restval: bool = True
) -> tuple[list[str], list[str], list[int]]:
    """``(captions, image paths, caption_to_image)`` of TERAN's training split, caption ``i`` = TERAN's id ``i``.

    Args:
        data_dir: TERAN's ``dataset.data`` directory (holds ``coco/annotations`` or ``f30k/annotations``).
        dataset: ``"coco"`` or ``"f30k"`` (TERAN's ``dataset.name``).
        images_path: TERAN's ``dataset.images-path`` (COCO: holds ``train2014/`` and ``val2014/``).
        restval: COCO only, TERAN's ``dataset.restval`` (default True, as in its configs).
    """
    data_dir, images_path = Path(data_dir), Path(images_path)
    if dataset == "coco":
        return _coco(data_dir, images_path, restval)
    if dataset == "f30k":
        return _f30k(data_dir, images_path)
    raise ValueError(f"dataset must be 'coco' or 'f30k' (TERAN's dataset.name), got {dataset!r}")
