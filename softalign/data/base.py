"""The retrieval data container shared by every loader: captions, images and the caption -> image map.

Convention (DESIGN.md): a caption's *global id* is its index in ``captions``; ``caption_to_image[id]`` is the
index of its image in ``images``. Several captions of one image are positives of each other; a training item is
one (image, caption) pair keyed by the caption id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _as_index_array(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


@dataclass
class RetrievalData:
    """One split of an image-text retrieval data set.

    Attributes:
        captions: the split's captions; caption id ``c`` is ``captions[c]``.
        images: one entry per image: file paths, PIL images, a ``datasets`` column view, or a feature array
            ``[N_images, ...]`` (precomputed region/grid features).
        caption_to_image: int64 ``[N_captions]``, ``caption_to_image[c]`` = index of the image of caption ``c``.
        image_labels: optional int64 ``[N_images]`` class labels (uni-modal retrieval: image->image).
        text_labels: optional int64 ``[N_captions]``; defaults to the label of each caption's image.
        label_names: optional names of the label values.
        name, split: for messages and manifests.
        metadata: free-form (source, licence / credit, ...).
    """

    captions: list[str]
    images: Any
    caption_to_image: Any  # array-like of ints; stored as an int64 np.ndarray
    image_labels: Any = None  # array-like of ints or None; stored as np.ndarray
    text_labels: Any = None
    label_names: list[str] | None = None
    name: str = "data"
    split: str = "train"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.captions = list(self.captions)
        bad = next((i for i, c in enumerate(self.captions) if not isinstance(c, str)), None)
        if bad is not None:
            raise TypeError(
                f"{self.name}/{self.split}: caption {bad} is a {type(self.captions[bad]).__name__}, expected str"
            )
        self.caption_to_image = _as_index_array(self.caption_to_image, "caption_to_image")
        if len(self.caption_to_image) != len(self.captions):
            raise ValueError(
                f"{self.name}/{self.split}: caption_to_image has {len(self.caption_to_image)} entries "
                f"but there are {len(self.captions)} captions (one image index per caption expected)"
            )
        n_img = self.num_images
        if len(self.caption_to_image):
            lo, hi = int(self.caption_to_image.min()), int(self.caption_to_image.max())
            if lo < 0 or hi >= n_img:
                raise ValueError(
                    f"{self.name}/{self.split}: caption_to_image values must lie in [0, {n_img}) "
                    f"(there are {n_img} images), got range [{lo}, {hi}]"
                )
        if self.image_labels is not None:
            self.image_labels = _as_index_array(self.image_labels, "image_labels")
            if len(self.image_labels) != n_img:
                raise ValueError(
                    f"{self.name}/{self.split}: image_labels has {len(self.image_labels)} entries for {n_img} images"
                )
            if self.text_labels is None:
                self.text_labels = self.image_labels[self.caption_to_image]
        if self.text_labels is not None:
            self.text_labels = _as_index_array(self.text_labels, "text_labels")
            if len(self.text_labels) != len(self.captions):
                raise ValueError(
                    f"{self.name}/{self.split}: text_labels has {len(self.text_labels)} entries "
                    f"for {len(self.captions)} captions"
                )

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def image_ids(self, caption_ids) -> np.ndarray:
        """Image index of each caption id."""
        return self.caption_to_image[np.asarray(caption_ids, dtype=np.int64)]

    def captions_of(self, image_index: int) -> list[int]:
        return np.flatnonzero(self.caption_to_image == image_index).tolist()

    def select_images(self, image_indices: Sequence[int], split: str | None = None) -> RetrievalData:
        """A new split holding the given images (in that order) and all of their captions, renumbered."""
        idx = _as_index_array(list(image_indices), "image_indices")
        if len(np.unique(idx)) != len(idx):
            raise ValueError("select_images: image_indices contains duplicates")
        remap = np.full(self.num_images, -1, dtype=np.int64)
        remap[idx] = np.arange(len(idx))
        keep = np.flatnonzero(remap[self.caption_to_image] >= 0)
        # captions grouped by their new image order, stable within an image
        keep = keep[np.argsort(remap[self.caption_to_image[keep]], kind="stable")]
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[int(i)] for i in idx]
        return RetrievalData(
            captions=[self.captions[int(c)] for c in keep],
            images=images,
            caption_to_image=remap[self.caption_to_image[keep]],
            image_labels=None if self.image_labels is None else self.image_labels[idx],
            text_labels=None if self.text_labels is None else self.text_labels[keep],
            label_names=self.label_names,
            name=self.name,
            split=split or self.split,
            metadata=dict(self.metadata),
        )

    def __repr__(self) -> str:
        return (
            f"RetrievalData(name={self.name!r}, split={self.split!r}, images={self.num_images}, "
            f"captions={self.num_captions}, labels={'yes' if self.image_labels is not None else 'no'})"
        )
