"""Torch datasets over :class:`~softalign.data.base.RetrievalData`: training pairs and encoding items.

A training item is one (image, caption) pair keyed by its *global caption id*::

    {"image": FloatTensor [3, H, W] (or the feature array), "caption": str, "id": caption id, "image_id": int}

so a batch carries ``ids`` for :class:`softalign.losses.SoftAlignLoss` and the teacher cache. Captions stay
strings; the text encoder tokenises them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from softalign.data.base import RetrievalData

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageTransform:
    """PIL / path -> normalised float tensor ``[3, size, size]`` (no torchvision needed).

    ``augment`` adds a random horizontal flip and a small random crop (scale 0.8-1), as VSE++-style training does,
    in front of the shared pipeline :class:`softalign.images.ImagePreprocessing` (shorter side to ``size``, center
    crop, normalisation; transparent images composited over white).

    The augmentation draws from torch's global RNG, which :class:`torch.utils.data.DataLoader` reseeds in every
    worker process for every epoch (``base_seed + worker_id``, ``base_seed`` drawn from the main process's RNG),
    and which the trainer seeds per epoch in the main process. A generator kept on the transform would instead be
    copied unchanged into each epoch's fresh workers, repeating the same augmentations every epoch.
    """

    def __init__(
        self,
        size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = False,
    ):
        from softalign.images import ImagePreprocessing

        if int(size) < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        self.size, self.augment = int(size), bool(augment)
        # the shared pipeline (softalign.images): shorter side to `size`, center crop, ImageNet normalisation
        self.preprocessing = ImagePreprocessing(
            size=(self.size, self.size),
            resize_shorter=self.size,
            interpolation="bilinear",
            mean=tuple(mean),
            std=tuple(std),
            scale=1.0,
        )

    def __call__(self, image, view=None) -> torch.Tensor:
        """``view``: the ``(s, x, y, flip)`` parameters of a stored view to replay
        (:class:`~softalign.teachers.views.ViewCache`) instead of a fresh random one; only with ``augment``."""
        from PIL import Image

        from softalign.images import apply_view, draw_view_params, to_rgb

        if not isinstance(image, Image.Image):
            with Image.open(image) as im:
                image = im.copy()
        image = to_rgb(image)
        if view is not None and not self.augment:
            raise ValueError("ImageTransform: a stored view is replayed only by an augmenting transform")
        if self.augment:
            image = apply_view(image, draw_view_params() if view is None else view)
        return self.preprocessing(image)


def _load_image(data: RetrievalData, index: int, transform, cache: torch.Tensor | None):
    if cache is not None:
        return cache[index]
    item = data.images[index]
    if isinstance(data.images, np.ndarray) or isinstance(item, np.ndarray):
        return torch.from_numpy(np.array(item, dtype=np.float32))  # a copy: mmap rows are read-only
    if transform is None:
        raise ValueError(f"{data.name}/{data.split}: images are not feature arrays, so an image transform is needed")
    return transform(item)


def preload_images(data: RetrievalData, transform) -> torch.Tensor:
    """Decode and transform every image once: ``[N_images, ...]`` (small data sets such as the demo)."""
    return torch.stack([_load_image(data, i, transform, None) for i in range(data.num_images)])


class PairDataset(Dataset):
    """One item per caption: ``{"image", "caption", "id", "image_id"}`` (see the module docstring).

    ``view_params`` (``[N_images, K, 4]``, a :class:`~softalign.teachers.views.ViewCache`'s ``params``): each item
    shows one of its image's K stored views, drawn at random (torch's global RNG), replayed by the augmenting
    ``transform``, and carries its number as ``"view"`` (the teacher embedding of that view is looked up with it).
    With ``preload`` every view is decoded once.
    """

    def __init__(self, data: RetrievalData, transform=None, preload: bool = False, view_params=None):
        self.data, self.transform = data, transform
        self.view_params = None if view_params is None else torch.as_tensor(view_params)
        if self.view_params is not None:
            if getattr(transform, "augment", False) is not True:
                raise ValueError("view_params need an augmenting image transform (data.augment), which replays them")
            if tuple(self.view_params.shape[::2]) != (data.num_images, 4):
                raise ValueError(
                    f"{data.name}/{data.split}: view_params must be [{data.num_images}, K, 4] (one set "
                    f"of views per image), got {tuple(self.view_params.shape)}"
                )
        self.cache: torch.Tensor | None
        if preload and self.view_params is not None:
            self.cache = torch.stack(
                [
                    torch.stack([transform(data.images[i], view=v) for v in self.view_params[i]])
                    for i in range(data.num_images)
                ]
            )
        else:
            self.cache = preload_images(data, transform) if preload else None

    def __len__(self) -> int:
        return self.data.num_captions

    def __getitem__(self, caption_id: int):
        caption_id = int(caption_id)
        image_id = int(self.data.caption_to_image[caption_id])
        item = {"caption": self.data.captions[caption_id], "id": caption_id, "image_id": image_id}
        if self.view_params is None:
            return {"image": _load_image(self.data, image_id, self.transform, self.cache), **item}
        k = int(torch.randint(self.view_params.shape[1], (1,)))
        image = (
            self.cache[image_id, k]
            if self.cache is not None
            else self.transform(self.data.images[image_id], view=self.view_params[image_id, k])
        )
        return {"image": image, "view": k, **item}


class ImagePairDataset(PairDataset):
    """One item per *image*, paired with one of its captions drawn at random (torch's global RNG) on each access.

    An epoch then visits every image once (CLIP-style sampling) instead of every caption (VSE++-style), which is
    ``captions_per_image`` times cheaper; items keep the global caption id of the drawn caption.
    """

    def __init__(self, data: RetrievalData, transform=None, preload: bool = False, view_params=None):
        super().__init__(data, transform, preload, view_params)
        order = np.argsort(data.caption_to_image, kind="stable")
        counts = np.bincount(data.caption_to_image, minlength=data.num_images)
        if (counts == 0).any():
            raise ValueError(f"{data.name}/{data.split}: image {int(np.flatnonzero(counts == 0)[0])} has no caption")
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.counts, self.order = counts, order

    def __len__(self) -> int:
        return self.data.num_images

    def __getitem__(self, image_id: int):
        image_id = int(image_id)
        k = int(torch.randint(int(self.counts[image_id]), (1,)))
        return super().__getitem__(int(self.order[self.starts[image_id] + k]))


class ImageDataset(Dataset):
    """One item per image (for encoding a test split): ``{"image", "index"}``."""

    def __init__(self, data: RetrievalData, transform=None, cache: torch.Tensor | None = None):
        self.data, self.transform, self.cache = data, transform, cache

    def __len__(self) -> int:
        return self.data.num_images

    def __getitem__(self, i: int):
        return {"image": _load_image(self.data, int(i), self.transform, self.cache), "index": int(i)}


def collate_pairs(items) -> dict:
    """Stack images, keep captions as a list, ids as int64 tensors."""
    out: dict = {"image": torch.stack([torch.as_tensor(it["image"]) for it in items])}
    if "caption" in items[0]:
        out["caption"] = [it["caption"] for it in items]
    for key in ("id", "image_id", "index", "view"):
        if key in items[0]:
            out[key] = torch.tensor([it[key] for it in items], dtype=torch.long)
    return out
