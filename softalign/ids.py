"""The caption -> image map, validated in one place (cache builds, training data, evaluation).

``caption_to_image[c]`` is the image index of caption ``c``; positives come from it everywhere (two captions of
one image are positives of each other, never negatives).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def check_caption_to_image(
    caption_to_image: Any,
    num_captions: int,
    num_images: int,
    *,
    every_image_captioned: bool = False,
    name: str = "caption_to_image",
) -> torch.Tensor:
    """``caption_to_image`` as a CPU int64 tensor ``[num_captions]``, refusing, with the first entry at fault named:
    a shape that is not one image index per caption, a non-integer dtype, an index outside ``[0, num_images)``, an
    empty gallery, and (``every_image_captioned``, as i2t retrieval needs) an image without a caption."""
    if isinstance(caption_to_image, np.ndarray):
        caption_to_image = torch.from_numpy(caption_to_image)
    c2i = torch.as_tensor(caption_to_image)
    if c2i.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one image index per caption), got shape {tuple(c2i.shape)}")
    if c2i.dtype.is_floating_point or c2i.dtype == torch.bool or c2i.is_complex():
        raise TypeError(f"{name} must hold integer image indices, got dtype {c2i.dtype}")
    c2i = c2i.to(torch.long).cpu()
    if c2i.numel() != num_captions:
        raise ValueError(
            f"{name} has {c2i.numel()} entries but there are {num_captions} captions "
            "(one image index per caption expected)"
        )
    if num_captions == 0 or num_images == 0:
        raise ValueError(f"empty gallery: {num_images} images and {num_captions} captions; need at least one of each")
    arr = c2i.numpy()
    bad = np.flatnonzero((arr < 0) | (arr >= num_images))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name}[{i}] = {int(arr[i])} is out of range: caption {i} maps to image {int(arr[i])}, "
            f"outside 0..{num_images - 1} ({num_images} images)"
        )
    if every_image_captioned:
        counts = np.bincount(arr, minlength=num_images)
        missing = np.flatnonzero(counts == 0)
        if missing.size:
            raise ValueError(
                f"image {int(missing[0])} has no caption ({missing.size} images without captions); every "
                "image needs at least one caption for i2t (drop caption-less images first)"
            )
    return c2i
