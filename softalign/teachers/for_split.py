"""A training split's teacher cache: found, checked against the split, or (re)built from it.

Used by the reference trainer (``softalign.train``) and by anything that trains on a
:class:`~softalign.data.base.RetrievalData` split: the cache check and rebuild belong with the cache, not with a
training loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softalign.data.base import RetrievalData


def _expected_fingerprint(train_data: RetrievalData, manifest: Mapping[str, Any]) -> dict[str, str]:
    """Fingerprint parts of the training split to check a cache against, restricted to the parts the cache
    computed the same way: the captions unless the cache imported text features; the images only when the cache
    hashed the images themselves (``source: computed``) and the split has images, not precomputed features (whose
    cache was built elsewhere, from the original images)."""
    from softalign.teachers.fingerprint import hash_caption_to_image, hash_captions

    stored = manifest.get("fingerprint") or {}
    parts = {"caption_to_image": hash_caption_to_image(torch.as_tensor(train_data.caption_to_image).long())}
    if "captions" in stored and not str(stored["captions"]).startswith("features:"):
        parts["captions"] = hash_captions(train_data.captions)
    if "images" in stored and stored.get("source") == "computed" and not isinstance(train_data.images, np.ndarray):
        from softalign.data.hf import DatasetColumn
        from softalign.teachers import TeacherCache

        images, column = train_data.images, None
        if isinstance(images, DatasetColumn):
            images, column = images.dataset, images.column
        parts["images"] = TeacherCache.fingerprint_of(
            train_data.captions,
            images,
            train_data.caption_to_image,
            image_column=column,
            image_hash=stored.get("image_hash", "stat"),
        )["images"]
    return parts


def check_cache_for_split(path: Path, train_data: RetrievalData, text_teacher: str, image_teacher: str):
    """``TeacherCache.load`` with the training split's fingerprint and the expected teachers; raises
    :class:`softalign.teachers.cache.CacheMismatchError` (a ValueError) naming what differs."""
    from softalign.teachers import TeacherCache
    from softalign.teachers.cache import CacheMismatchError

    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}  # TeacherCache.load reports the broken manifest
    cache = TeacherCache.load(
        path,
        expect_fingerprint=_expected_fingerprint(train_data, manifest),
        expect_text_teacher=text_teacher,
        expect_image_teacher=image_teacher,
    )
    if cache.num_captions != train_data.num_captions or cache.num_images != train_data.num_images:
        raise CacheMismatchError(
            f"teacher cache {path} holds {cache.num_captions} captions / {cache.num_images} images but the training "
            f"split has {train_data.num_captions} / {train_data.num_images}"
        )
    if not torch.equal(
        torch.as_tensor(cache.caption_to_image).long().cpu(), torch.as_tensor(train_data.caption_to_image).long()
    ):
        raise CacheMismatchError(f"teacher cache {path} has a different caption->image map than the training split")
    return cache


def cache_for_split(
    path: Path,
    train_data: RetrievalData,
    *,
    text_teacher: str,
    image_teacher: str,
    chunk_size: int = 4096,
    dtype: str = "float16",
    rebuild_on_mismatch: bool = False,
    accelerator=None,
    progress: bool = True,
    log: Callable = print,
    fix_hint: str = "pass the matching cache directory, or rebuild_on_mismatch=True",
):
    """The teacher cache of a training split in ``path``, built from the split the first time.

    An existing cache is checked against the split (captions, caption->image map, and the images when the cache
    hashed them) and the teachers (packaged-model aliases count as the same teacher). On a mismatch it is rebuilt
    in place with ``rebuild_on_mismatch``, else the :class:`~softalign.teachers.cache.CacheMismatchError` (a
    ValueError) says what differs and how to fix it (``fix_hint``).
    """
    from softalign.teachers import TeacherCache
    from softalign.teachers.cache import CacheMismatchError

    path = Path(path)
    overwrite = False
    if (path / "manifest.json").is_file():
        try:
            return check_cache_for_split(path, train_data, text_teacher, image_teacher)
        except CacheMismatchError as err:
            if not rebuild_on_mismatch or isinstance(train_data.images, np.ndarray):
                raise CacheMismatchError(
                    f"{err} -- the cache does not belong to this training split / these teachers: delete it, "
                    f"{fix_hint}"
                ) from None
            log(f"rebuilding the stale teacher cache in {path}: {err}")
            overwrite = True
    images = train_data.images
    if isinstance(images, np.ndarray):
        raise FileNotFoundError(
            f"no teacher cache at {path}: with precomputed features the image teacher needs the original images; "
            "build the cache once with `softalign cache` over the training captions and images and set "
            "teacher.cache_dir to it"
        )
    from softalign.data.hf import DatasetColumn

    kw = {}
    if isinstance(images, DatasetColumn):
        images, kw = images.dataset, {"image_column": images.column}
    log(f"building the teacher cache in {path} ({train_data.num_captions} captions, {train_data.num_images} images)")
    return TeacherCache.build(
        path,
        train_data.captions,
        images,
        train_data.caption_to_image,
        text_teacher=text_teacher,
        image_teacher=image_teacher,
        chunk_size=chunk_size,
        dtype=dtype,
        accelerator=accelerator,
        progress=progress,
        overwrite=overwrite,
        **kw,
    )
