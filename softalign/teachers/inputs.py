"""Validated build inputs: captions, the caption->image map, and image sources.

An image source is a list of file paths, a list of PIL images, or a ``datasets.Dataset`` with an
image column (decoded ``Image`` feature or path strings). Validation happens before any teacher
runs, and every error names the offending item: the caption index, the image index and path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from softalign.images import is_pil as _is_pil
from softalign.images import load_image


def validate_captions(captions: Sequence[str]) -> list[str]:
    """Return captions as a list; raises naming the first empty or non-string caption."""
    if isinstance(captions, (str, bytes)):
        raise TypeError("captions must be a sequence of strings, got a single string")
    out = list(captions)
    if not out:
        raise ValueError("captions is empty: a teacher cache needs at least one caption")
    for i, c in enumerate(out):
        if not isinstance(c, str):
            raise TypeError(f"caption {i} is {type(c).__name__}, expected str: {c!r:.80}")
        if not c.strip():
            raise ValueError(f"caption {i} is empty (or whitespace only); remove it or give it text")
    return out


def validate_caption_to_image(caption_to_image, num_captions: int, num_images: int) -> torch.Tensor:
    """caption->image map as int64 [num_captions]; see :func:`softalign.ids.check_caption_to_image`."""
    from softalign.ids import check_caption_to_image

    if num_captions == 0:
        raise ValueError("captions is empty: a teacher cache needs at least one caption")
    return check_caption_to_image(caption_to_image, num_captions, num_images)


class ImageSource:
    """Uniform, validated access to the images of a data set.

    ``images`` is a sequence of paths / PIL images, or a ``datasets.Dataset`` (``image_column``
    picks the column; by default the one with an ``Image`` feature, else ``"image"``).
    """

    def __init__(self, images, image_column: str | None = None, root: str | None = None):
        self.dataset: Any = None
        self.column: str | None = None
        self.items: list[Any] = []
        self.root = Path(root) if root else None
        if _is_hf_dataset(images):
            self.dataset = images
            self.column = image_column or _guess_image_column(images)
            if self.column not in images.column_names:
                raise ValueError(f"image column {self.column!r} not in the dataset (columns: {images.column_names})")
            self.kind = "dataset"
        else:
            if isinstance(images, (str, bytes, os.PathLike)):
                raise TypeError(
                    "images must be a sequence of paths or PIL images (or a datasets.Dataset), "
                    "got a single path; use a list, or the CLI's --images DIR"
                )
            self.items = list(images)
            kinds = {
                "path" if isinstance(x, (str, os.PathLike)) else "pil" if _is_pil(x) else "other" for x in self.items
            }
            if "other" in kinds:
                i = next(i for i, x in enumerate(self.items) if not (isinstance(x, (str, os.PathLike)) or _is_pil(x)))
                raise TypeError(f"image {i} is a {type(self.items[i]).__name__}; expected a file path or a PIL.Image")
            self.kind = "paths" if kinds == {"path"} else "pil" if kinds == {"pil"} else "mixed"
        if len(self) == 0:
            raise ValueError("images is empty: a teacher cache needs at least one image")

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.items)

    def _path(self, x) -> Path:
        p = Path(x)
        return self.root / p if self.root is not None and not p.is_absolute() else p

    def check(self) -> None:
        """Fail fast on missing files and duplicates, naming the image index and path.

        Two entries are the same image when they are the same file on disk (device + inode), so a symlink or a
        hard link to an image listed already is refused like a repeated path: their captions would otherwise be
        taken as negatives of each other.
        """
        if self.dataset is not None:
            return
        seen: dict = {}
        for i, x in enumerate(self.items):
            if isinstance(x, (str, os.PathLike)):
                p = self._path(x)
                if not p.is_file():
                    raise FileNotFoundError(f"image {i}: file not found: {p}")
                st = p.stat()  # follows symlinks
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    j = seen[key]
                    same = (
                        "the same path"
                        if os.path.abspath(p) == os.path.abspath(self._path(self.items[j]))
                        else f"the same file as {self._path(self.items[j])} (a symlink or hard link)"
                    )
                    raise ValueError(
                        f"image {i} ({p}) duplicates image {j}: it is {same}. Each image must appear once; "
                        "point several captions at one image through caption_to_image instead"
                    )
                seen[key] = i

    def load(self, i: int):
        """Image ``i`` as an RGB PIL image; errors name the index and path."""
        x = self.dataset[i][self.column] if self.dataset is not None else self.items[i]
        return load_image(x, i, resolve=self._path)

    def fingerprint(self, mode: str = "content") -> str:
        """Identity of the images: paths + the SHA-256 of each file (``mode="content"``) or + file sizes
        (``"stat"``), PIL pixel hashes, or the dataset's fingerprint."""
        if mode not in ("content", "stat"):
            raise ValueError(f"image_hash must be 'content' or 'stat', got {mode!r}")
        h = hashlib.sha256()
        if self.dataset is not None:
            fp = getattr(self.dataset, "_fingerprint", None)
            h.update(f"dataset|{fp}|{self.column}|{len(self.dataset)}".encode())
            if fp is None:  # no fingerprint: hash the column contents
                for i in range(len(self.dataset)):
                    h.update(_pil_digest(self.load(i)).encode())
            return h.hexdigest()
        for i, x in enumerate(self.items):
            if isinstance(x, (str, os.PathLike)):
                p = self._path(x)
                try:
                    if mode == "stat":
                        h.update(f"path|{Path(x).as_posix()}|{p.stat().st_size}\n".encode())
                    else:
                        h.update(f"content|{Path(x).as_posix()}|{_file_digest(p)}\n".encode())
                except FileNotFoundError:
                    raise FileNotFoundError(f"image {i}: file not found: {p}") from None
            else:
                h.update(f"pil|{_pil_digest(x)}\n".encode())
        return h.hexdigest()

    def describe(self, i: int) -> str:
        if self.dataset is None and isinstance(self.items[i], (str, os.PathLike)):
            return f"image {i} ({self._path(self.items[i])})"
        return f"image {i}"


def _file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _pil_digest(img) -> str:
    h = hashlib.sha256(f"{img.mode}|{img.size}|".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _is_hf_dataset(x) -> bool:
    mod = type(x).__module__ or ""
    return mod.startswith("datasets") and hasattr(x, "column_names") and hasattr(x, "features")


def _guess_image_column(ds) -> str:
    try:
        from datasets import Image as ImageFeature

        for name, feat in ds.features.items():
            if isinstance(feat, ImageFeature):
                return name
    except ImportError:  # pragma: no cover
        pass
    for name in ("image", "img", "image_path", "path", "file_name", "filename"):
        if name in ds.column_names:
            return name
    raise ValueError(
        f"cannot tell which dataset column holds the images (columns: {ds.column_names}); pass image_column="
    )
