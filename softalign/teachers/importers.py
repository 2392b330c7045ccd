"""Import existing teacher features into a :class:`TeacherCache`.

Two ``.npy`` layouts are understood:

* a plain matrix ``[num_items, D]`` (``np.save(path, features)``), row ``i`` = item ``i``; it is
  memory-mapped, so importing never holds the whole matrix in RAM;
* CUSA's image-teacher file, a pickled dict ``{image_id: array(1, D)}`` saved with ``np.save``
  (``np.load(path, allow_pickle=True).item()``). Row order follows ``image_keys`` when given, else the
  dict's insertion order (CUSA builds it in data-set order); the keys are recorded in the manifest and
  captions may name their image by key (``image_refs``; integer keys are keys too, never row numbers).

Pickled files can execute code when loaded, so they are refused unless ``allow_pickle=True`` (CLI:
``--allow-pickle``): import only files you trust. Text features come from a ``.npy`` matrix too, or are computed
from ``captions`` with a text teacher.

Region features (SCAN / bottom-up attention, ``[num_images, regions, D]``, e.g. ``[N, 36, 2048]``) are pooled to
one row per image with ``pool="mean"`` (the average region feature) or ``pool="max"`` (the element-wise maximum);
a 3-D array without ``pool`` is refused. Pooling runs block by block, so a memory-mapped file is never loaded
whole.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softalign.io import file_sha256

from .build import array_source, build_cache, text_source
from .fingerprint import combine, hash_caption_to_image, hash_captions


def _array_hash(a) -> str:
    h = hashlib.sha256(f"{a.shape}|{a.dtype}|".encode())
    for s in range(0, len(a), 65536):
        h.update(np.ascontiguousarray(a[s : s + 65536]).tobytes())
    return h.hexdigest()


POOLS = ("mean", "max")


class PooledRows:
    """Rows of ``[N, R, D]`` region features pooled over the regions on access (``rows[s:e]`` -> ``[e-s, D]``)."""

    def __init__(self, array, pool: str):
        self.array, self.pool = array, pool
        self.shape = (int(array.shape[0]), int(array.shape[2]))
        self.ndim = 2
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        if not isinstance(rows, slice):
            raise TypeError("PooledRows supports slices of rows only")
        block = np.asarray(self.array[rows], dtype=np.float32)
        return block.mean(axis=1) if self.pool == "mean" else block.max(axis=1)


def _check_matrix(a, what: str, pool: str | None = None):
    if pool is not None and pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if a.ndim == 3 and a.shape[1] == 1:
        a = a[:, 0, :]
    elif a.ndim == 3:
        if pool is None:
            raise ValueError(
                f"{what}: got region features of shape {tuple(a.shape)} (images x regions x dim); "
                "pool them to one row per image with pool='mean' or 'max' (CLI: --pool mean)"
            )
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"{what}: expected floating-point features, got dtype {a.dtype}")
        a = PooledRows(a, pool)
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D feature matrix [num_items, dim], got shape {tuple(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{what}: feature matrix is empty (shape {tuple(a.shape)})")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{what}: expected floating-point features, got dtype {a.dtype}")
    return a


def is_integer_ref(x) -> bool:
    """Whether an image reference is an integer (a key or a position), not a name; booleans are not."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def find_key(ref, keys) -> object | None:
    """The key of a feature dict that ``ref`` names, or ``None``.

    An exact match wins; otherwise an integer and its decimal string name the same image (``5`` <->
    ``"5"``): a JSON records file or a ``.txt`` key list may spell the ids of an int-keyed dict as
    strings, and the other way round.
    """
    try:
        if ref in keys:
            return ref
    except TypeError:  # unhashable ref
        return None
    alt: object
    if is_integer_ref(ref):
        alt = str(int(ref))
    elif isinstance(ref, str) and ref.strip().lstrip("-").isdigit():
        alt = int(ref.strip())
    else:
        return None
    return alt if alt in keys else None


def _dict_to_matrix(
    d: dict, image_keys: Sequence | None, what: str, pool: str | None = None
) -> tuple[np.ndarray, list]:
    if not d:
        raise ValueError(f"{what}: the feature dict is empty")
    if image_keys is None:
        keys = list(d.keys())
    else:
        keys = []
        seen: dict[Any, int] = {}
        for i, given in enumerate(image_keys):
            k = find_key(given, d)
            if k is None:
                raise KeyError(f"{what}: image key {given!r} (position {i}) has no features in the file")
            if k in seen:
                raise ValueError(f"{what}: image key {given!r} is listed twice (positions {seen[k]} and {i})")
            seen[k] = i
            keys.append(k)
    dim: int | None = None
    out = np.empty((0, 0), dtype=np.float32)
    for i, k in enumerate(keys):
        v = np.asarray(d[k])
        if v.ndim == 2 and v.shape[0] == 1:
            v = v[0]
        elif v.ndim == 2 and pool is not None:  # regions x dim
            v = v.astype(np.float32).mean(axis=0) if pool == "mean" else v.astype(np.float32).max(axis=0)
        if v.ndim != 1:
            raise ValueError(
                f"{what}: features of image {k!r} have shape {tuple(np.shape(d[k]))}; expected (1, D) or (D,)"
            )
        if dim is None:
            dim = v.shape[0]
            out = np.empty((len(keys), dim), dtype=np.float32)
        elif v.shape[0] != dim:
            raise ValueError(
                f"{what}: features of image {k!r} are {v.shape[0]}-d, but image {keys[0]!r} is "
                f"{dim}-d (all entries must have the same dimension)"
            )
        out[i] = v
    return out, keys


def read_features(
    src,
    image_keys: Sequence | None = None,
    allow_pickle: bool = False,
    what: str | None = None,
    pool: str | None = None,
) -> tuple[np.ndarray, list | None, str]:
    """Load features from a .npy path, an array or a dict -> (matrix [N, D], keys or None, content hash).

    A pickled ``.npy`` (CUSA's dict) is refused unless ``allow_pickle=True``; ``pool`` reduces region features
    ``[N, R, D]`` to ``[N, D]`` (``"mean"`` / ``"max"``)."""
    keys = None
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        what = what or str(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature file not found: {path}")
        digest = file_sha256(path)
        try:
            obj = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:  # object array: CUSA's pickled dict
            if not allow_pickle:
                raise ValueError(
                    f"{what} holds pickled Python objects (CUSA's {{image_id: array}} dict format), and "
                    "loading a pickle can run code from the file. If you trust it, pass --allow-pickle "
                    "(API: allow_pickle=True)"
                ) from None
            obj = np.load(path, allow_pickle=True)
        if isinstance(obj, np.ndarray) and obj.dtype == object:
            obj = obj.item() if obj.ndim == 0 else obj
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{what}: expected a feature matrix or a {{image_id: array(1, D)}} dict, got {type(obj).__name__}"
                )
    else:
        obj = src
        what = what or "features"
        digest = None
    if isinstance(obj, dict):
        mat, keys = _dict_to_matrix(obj, image_keys, what, pool)
    else:
        mat = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else obj
        if not isinstance(mat, np.ndarray):
            mat = np.asarray(mat)
        mat = _check_matrix(mat, what, pool)
        if image_keys is not None:
            raise ValueError(f"{what}: image_keys only apply to the dict format; a matrix is indexed by row")
    if digest is None:
        digest = _array_hash(mat)
    return mat, keys, digest


def map_image_refs(refs: Sequence, keys: list | None, num_images: int) -> list[int]:
    """Image index (row of the imported matrix) of each caption's image reference.

    With dict features (``keys`` = the dict's keys in row order) every reference is looked up among the
    keys -- integers included: ``{9: ..., 25: ...}`` with a record ``"image_id": 25`` is row 1, never row 25
    (see :func:`find_key` for ``25`` vs ``"25"``). With a plain matrix (``keys is None``) a reference must
    be an integer row index.
    """
    refs = refs.tolist() if isinstance(refs, (np.ndarray, torch.Tensor)) else list(refs)
    if keys is None:
        for j, r in enumerate(refs):
            if not is_integer_ref(r):
                raise ValueError(
                    f"caption {j} names image {r!r} by key, but the image features are a plain "
                    f"matrix indexed by row: give row indices (0..{num_images - 1}), or a "
                    "{image_id: array(1, D)} dict"
                )
        return [int(r) for r in refs]
    index = {k: i for i, k in enumerate(keys)}
    mapped = []
    for j, r in enumerate(refs):
        k = find_key(r, index)
        if k is None:
            raise KeyError(
                f"caption {j} refers to image {r!r}, which has no features in the imported file "
                f"(keys look like {keys[0]!r})"
            )
        mapped.append(index[k])
    return mapped


def import_npy(
    out_dir,
    image_features,
    caption_to_image=None,
    captions: Sequence[str] | None = None,
    text_features=None,
    text_teacher="offline-minilm",
    image_keys: Sequence | None = None,
    image_teacher_name: str | None = None,
    text_teacher_name: str | None = None,
    chunk_size: int = 4096,
    dtype="float16",
    fingerprint=None,
    overwrite: bool = False,
    progress: bool = True,
    accelerator=None,
    allow_pickle: bool = False,
    device=None,
    image_refs: Sequence | None = None,
    pool: str | None = None,
    command: str | None = None,
):
    """Make a cache from existing image features (+ text features, or captions and a text teacher).

    Args:
        image_features: ``.npy`` path (matrix or CUSA dict), array, tensor or dict.
        caption_to_image: image index per caption (a row of the matrix; for the dict format, a position in
            ``image_keys`` / the dict's order). A list of non-integer entries (strings) is read as image keys,
            like ``image_refs``.
        image_refs: instead of ``caption_to_image``, the image *reference* of each caption as a records file
            names it (CUSA/ALBEF ``"image_id"``): with the dict format always a key of the dict, integers
            included (see :func:`map_image_refs`); with a plain matrix an integer row index.
        captions: caption strings, encoded with ``text_teacher`` unless ``text_features`` is given
            (they are also hashed into the fingerprint).
        text_features: ``.npy`` path / array ``[num_captions, Dt]``.
        allow_pickle: load a pickled ``.npy`` (CUSA's dict); off by default, since a pickle can run code.
        pool: ``"mean"`` / ``"max"`` over the regions of ``[N, R, D]`` image features (SCAN's bottom-up
            features); recorded in the manifest's image teacher (``pool``).
        image_teacher_name / text_teacher_name: names recorded for the imported features (default
            ``"imported:<file name>"``); ``load(expect_image_teacher=...)`` compares against them.

    Returns:
        the loaded :class:`~softalign.teachers.TeacherCache`.
    """
    from .cache import TeacherCache
    from .inputs import validate_caption_to_image, validate_captions
    from .text import resolve_text_teacher

    img, keys, img_hash = read_features(image_features, image_keys, allow_pickle, what=None, pool=pool)
    iname = image_teacher_name or (
        f"imported:{Path(image_features).name}" if isinstance(image_features, (str, os.PathLike)) else "imported:image"
    )
    if pool is not None:
        img_hash = f"{img_hash}:{pool}-pooled"  # another pooling is other data
        if image_teacher_name is None:
            iname += f" ({pool}-pooled regions)"
    if (caption_to_image is None) == (image_refs is None):
        raise ValueError(
            "give exactly one of caption_to_image (image index per caption) and image_refs (image key per caption)"
        )
    if image_refs is not None:
        c2i_raw = map_image_refs(image_refs, keys, len(img))
    else:
        c2i_raw = caption_to_image
        if not isinstance(c2i_raw, (np.ndarray, torch.Tensor)):
            c2i_raw = list(c2i_raw)
            if any(not is_integer_ref(x) for x in c2i_raw):  # named by key (strings)
                c2i_raw = map_image_refs(c2i_raw, keys, len(img))

    if text_features is not None:
        txt, _, txt_hash = read_features(text_features, None, allow_pickle=False, what=None)
        n_captions = len(txt)
        tname = text_teacher_name or (
            f"imported:{Path(text_features).name}"
            if isinstance(text_features, (str, os.PathLike))
            else "imported:text"
        )
        if captions is not None:
            captions = validate_captions(captions)
            if len(captions) != n_captions:
                raise ValueError(f"text features have {n_captions} rows but {len(captions)} captions were given")
        tsrc = array_source("text", txt, {"name": tname, "dim": int(txt.shape[1]), "kind": "imported"})
    else:
        if captions is None:
            raise ValueError("give either text_features (a .npy matrix) or captions (encoded with text_teacher)")
        captions = validate_captions(captions)
        n_captions = len(captions)
        txt_hash = None
        tsrc = text_source(resolve_text_teacher(text_teacher, device=device), captions)
    c2i = validate_caption_to_image(c2i_raw, n_captions, len(img))

    if fingerprint is None:
        fp = {
            "captions": hash_captions(captions) if captions is not None else f"features:{txt_hash}",
            "caption_to_image": hash_caption_to_image(c2i),
            "images": f"features:{img_hash}",
        }
        fp["dataset"] = combine(fp)
        fp["source"] = "imported"
    elif isinstance(fingerprint, dict):
        fp = dict(fingerprint)
    else:
        fp = {"dataset": str(fingerprint), "source": "user"}
    iinfo = {
        "name": iname,
        "dim": int(img.shape[1]),
        "kind": "imported",
        "file": str(image_features) if isinstance(image_features, (str, os.PathLike)) else None,
    }
    if pool is not None:
        iinfo["pool"] = pool
    isrc = array_source("image", img, iinfo)
    extra = (
        {"image_keys": [int(k) if is_integer_ref(k) else k if isinstance(k, str) else str(k) for k in keys]}
        if keys is not None
        else None
    )
    build_cache(
        out_dir,
        tsrc,
        isrc,
        c2i,
        fp,
        chunk_size=chunk_size,
        dtype=dtype,
        accelerator=accelerator,
        overwrite=overwrite,
        progress=progress,
        extra=extra,
        command=command,
    )
    return TeacherCache.load(out_dir, expect_fingerprint=fp)
