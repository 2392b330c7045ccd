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

    def __init__(self, size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 augment: bool = False):
        from softalign.images import ImagePreprocessing

        if int(size) < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        self.size, self.augment = int(size), bool(augment)
        # the shared pipeline (softalign.images): shorter side to `size`, center crop, ImageNet normalisation
        self.preprocessing = ImagePreprocessing(size=(self.size, self.size), resize_shorter=self.size,
                                                interpolation="bilinear", mean=tuple(mean), std=tuple(std), scale=1.0)

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        from softalign.images import to_rgb

        if not isinstance(image, Image.Image):
            with Image.open(image) as im:
                image = im.copy()
        image = to_rgb(image)
        if self.augment:
            w, h = image.size
            s = 0.8 + 0.2 * float(torch.rand(()))
            cw, ch = max(1, int(w * s)), max(1, int(h * s))
            x0 = int(torch.randint(0, w - cw + 1, ()))
            y0 = int(torch.randint(0, h - ch + 1, ()))
            image = image.crop((x0, y0, x0 + cw, y0 + ch))
            if float(torch.rand(())) < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
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
    """One item per caption: ``{"image", "caption", "id", "image_id"}`` (see the module docstring)."""

    def __init__(self, data: RetrievalData, transform=None, preload: bool = False):
        self.data, self.transform = data, transform
        self.cache = preload_images(data, transform) if preload else None

    def __len__(self) -> int:
        return self.data.num_captions

    def __getitem__(self, caption_id: int):
        caption_id = int(caption_id)
        image_id = int(self.data.caption_to_image[caption_id])
        return {"image": _load_image(self.data, image_id, self.transform, self.cache),
                "caption": self.data.captions[caption_id], "id": caption_id, "image_id": image_id}


class ImagePairDataset(PairDataset):
    """One item per *image*, paired with one of its captions drawn at random (torch's global RNG) on each access.

    An epoch then visits every image once (CLIP-style sampling) instead of every caption (VSE++-style), which is
    ``captions_per_image`` times cheaper; items keep the global caption id of the drawn caption.
    """

    def __init__(self, data: RetrievalData, transform=None, preload: bool = False):
        super().__init__(data, transform, preload)
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
    for key in ("id", "image_id", "index"):
        if key in items[0]:
            out[key] = torch.tensor([it[key] for it in items], dtype=torch.long)
    return out
