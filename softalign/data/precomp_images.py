"""The raw images of a VSE++ / SCAN precomp split, in the order of its ``{split}_ims.npy`` rows.

The precomp folders (``data/coco_precomp``, ``data/f30k_precomp``) hold features, not images, but the image
teacher of a cache needs the images, listed in the order of the feature rows (image ``i`` = row ``i`` of
``train_ims.npy``, whose captions are lines ``5i..5i+4`` of ``train_caps.txt``). Neither ``data.py`` says which
image a row is; the ``{split}_ids.txt`` file that ships with the features does: one image id per line, either
one line per image (the row order) or one line per caption (``captions_per_image`` equal lines per image, the
caption order). :func:`precomp_image_paths` turns it into file paths:

* **COCO**: ids are COCO image ids; ``--coco-annotations`` (``captions_train2014.json``, ``captions_val2014.json``,
  or any COCO json with an ``images`` list) give each id's ``file_name``, found under ``--images-root``
  (searched as ``ROOT/file_name``, ``ROOT/train2014/file_name`` and ``ROOT/val2014/file_name``);
* **Flickr30k**: ids are Flickr photo ids and the files are ``<id>.jpg``: ``--pattern "{id}.jpg"``.

``softalign cache precomp-images`` writes the list (one path per line) for ``softalign cache build --images
LIST.txt --captions train_caps.txt --captions-per-image 5``; the number of lines is checked against the rows of
``train_ims.npy`` when ``--ims`` is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from softalign.io import read_json

PathLike = str | os.PathLike


def read_ids(path: PathLike, captions_per_image: int = 5, num_images: int | None = None) -> list[str]:
    """Image ids of an ``{split}_ids.txt``, one per image in row order (a per-caption file is folded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ids {path}: file not found")
    ids = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not ids:
        raise ValueError(f"--ids {path}: no ids")
    k = int(captions_per_image)
    grouped = len(ids) % k == 0 and all(ids[i] == ids[i - i % k] for i in range(len(ids)))
    unique = len(set(ids)) == len(ids)
    if num_images is not None and len(ids) == num_images and unique:
        return ids
    if grouped and len(set(ids[::k])) == len(ids) // k and (num_images is None or len(ids) == k * num_images):
        return ids[::k]  # one line per caption: fold each image's k lines
    if num_images is None and unique:
        return ids
    if num_images is not None and len(ids) not in (num_images, k * num_images):
        raise ValueError(
            f"--ids {path} has {len(ids)} lines, but the features hold {num_images} rows (expected "
            f"{num_images} ids, one per image, or {k * num_images}, one per caption); check that both "
            "files belong to the same split"
        )
    raise ValueError(
        f"--ids {path}: the ids are neither one per image (some repeat) nor {k} equal consecutive lines "
        "per image (--captions-per-image)"
    )


def _coco_files(annotations: Sequence[PathLike]) -> dict[str, str]:
    files: dict[str, str] = {}
    for a in annotations:
        data = read_json(a, "--coco-annotations")
        for im in data.get("images", []):
            files[str(im["id"])] = im["file_name"]
    return files


def precomp_image_paths(
    ids_file: PathLike,
    *,
    images_root: PathLike,
    coco_annotations: Sequence[PathLike] = (),
    pattern: str | None = None,
    captions_per_image: int = 5,
    num_images: int | None = None,
    check_files: bool = True,
) -> list[str]:
    """Image paths in ``{split}_ims.npy`` row order (see the module docstring); errors name the id at fault."""
    if bool(coco_annotations) == bool(pattern):
        raise ValueError(
            "give either --coco-annotations (COCO image ids) or --pattern (e.g. '{id}.jpg' for Flickr30k)"
        )
    ids = read_ids(ids_file, captions_per_image, num_images)
    root = Path(images_root)
    files = _coco_files(coco_annotations) if coco_annotations else {}
    out = []
    for row, image_id in enumerate(ids):
        if pattern:
            candidates = [root / pattern.format(id=image_id)]
        else:
            key = str(int(image_id)) if image_id.isdigit() else image_id
            if key not in files:
                raise KeyError(f"row {row}: image id {image_id} is in none of the --coco-annotations files")
            candidates = [root / files[key], root / "train2014" / files[key], root / "val2014" / files[key]]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            if check_files:
                raise FileNotFoundError(
                    f"row {row}: image {image_id} not found (looked for {', '.join(str(c) for c in candidates)})"
                )
            found = candidates[0]
        out.append(str(found))
    return out
