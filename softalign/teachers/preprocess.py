"""Image preprocessing with PIL + torch only (no torchvision).

``resize shorter side -> center crop -> to float -> (x - mean) / std``, the evaluation transform of
ImageNet classifiers. The parameters are stored in the cache manifest so a cache records exactly how
its image-teacher features were made.

* EfficientNet-Lite (Tan & Le, "EfficientNet", ICML 2019; TF reference ``efficientnet/lite``): RGB in
  0..255, ``mean = 127``, ``std = 128`` (``efficientnet_lite_builder.MEAN_RGB / STDDEV_RGB``), bicubic
  resize to 224 / 0.875 = 256 and 224 center crop. (On the packaged Lite0 weights this gives markedly
  more confident ImageNet predictions on skimage's ``chelsea`` / ``coffee`` than torchvision's
  ImageNet mean/std, confirming the weights were trained with it.)
* timm models: ``mean``, ``std``, ``crop_pct``, ``interpolation`` and ``input_size`` come from the
  model's pretrained config (``timm.data.resolve_model_data_config``), values on the 0..1 scale.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


def to_rgb(img):
    """PIL image -> RGB; transparent pixels (RGBA, LA, palette with transparency) are composited on white."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


_INTERP = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}


@dataclass
class ImagePreprocessing:
    """Evaluation transform; ``scale`` is 255.0 when mean/std are given on the 0..255 scale, else 1.0."""

    size: tuple[int, int] = (224, 224)
    resize_shorter: int = 256
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    scale: float = 255.0
    color: str = "RGB (alpha composited on white)"
    steps: list[str] = field(default_factory=lambda: ["resize_shorter", "center_crop", "normalize"])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    def __call__(self, img) -> torch.Tensor:
        """PIL image -> float tensor [3, H, W]."""
        img = to_rgb(img)
        w, h = img.size
        s = self.resize_shorter / min(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample=_INTERP.get(self.interpolation, 3))
        th, tw = self.size
        if nw < tw or nh < th:  # tiny resize_shorter: pad by resizing up to the crop
            img = img.resize((max(nw, tw), max(nh, th)), resample=_INTERP.get(self.interpolation, 3))
            nw, nh = img.size
        left, top = (nw - tw) // 2, (nh - th) // 2
        img = img.crop((left, top, left + tw, top + th))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        if self.scale != 255.0:
            x = x * (self.scale / 255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std

    def batch(self, images: Sequence) -> torch.Tensor:
        return torch.stack([self(img) for img in images])


def efficientnet_lite_preprocessing(image_size: int = 224) -> ImagePreprocessing:
    return ImagePreprocessing(size=(image_size, image_size), resize_shorter=int(math.floor(image_size / 0.875)),
                              interpolation="bicubic", mean=(127.0,) * 3, std=(128.0,) * 3, scale=255.0)


def from_timm_data_config(cfg: dict) -> ImagePreprocessing:
    """timm data config (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``) -> transform."""
    _, h, w = tuple(cfg.get("input_size", (3, 224, 224)))
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    interp = str(cfg.get("interpolation") or "bicubic")
    if interp not in _INTERP:
        interp = "bicubic"
    return ImagePreprocessing(
        size=(int(h), int(w)), resize_shorter=int(math.floor(min(h, w) / crop_pct)), interpolation=interp,
        mean=tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225))), scale=1.0,
    )
