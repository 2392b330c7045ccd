"""Ground-floor image handling, one pipeline for everything that turns an image into a tensor: loading (paths,
PIL images, undecoded ``datasets`` values; alpha composited on white) and :class:`ImagePreprocessing` (resize the
shorter side, center crop, normalise), used by the image teachers (whose parameters a cache manifest records) and
by the reference trainer's :class:`~softalign.data.pairs.ImageTransform` (which adds augmentation in front).
PIL + torch only (no torchvision).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["to_rgb", "ImagePreprocessing", "load_image", "is_pil", "draw_view_params", "apply_view"]


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
    mean: tuple[float, ...] = (127.0, 127.0, 127.0)
    std: tuple[float, ...] = (128.0, 128.0, 128.0)
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
        # torchvision's Resize(int) / CenterCrop arithmetic, so that a timm model sees exactly the pixels of
        # timm.data.create_transform: the shorter side becomes resize_shorter, the longer int(size * long / short)
        short, long = (w, h) if w <= h else (h, w)
        new_long = max(1, int(self.resize_shorter * long / short))
        nw, nh = (self.resize_shorter, new_long) if w <= h else (new_long, self.resize_shorter)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample=_INTERP.get(self.interpolation, 3))
        th, tw = self.size
        if nw < tw or nh < th:  # tiny resize_shorter: pad by resizing up to the crop
            img = img.resize((max(nw, tw), max(nh, th)), resample=_INTERP.get(self.interpolation, 3))
            nw, nh = img.size
        left, top = int(round((nw - tw) / 2.0)), int(round((nh - th) / 2.0))
        img = img.crop((left, top, left + tw, top + th))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        if self.scale != 255.0:
            x = x * (self.scale / 255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std

    def batch(self, images: Sequence) -> torch.Tensor:
        return torch.stack([self(img) for img in images])


def load_image(x, i: int, resolve=Path):
    """One image as an RGB PIL image (transparency composited on white, :func:`~.preprocess.to_rgb`).

    ``x`` is a PIL image, a file path (``resolve(x)`` gives the file; e.g. joined to an image root), a
    binary file object, or an undecoded ``datasets`` ``Image`` value ``{"path": ..., "bytes": ...}``.
    ``i`` is the image's index, named in every error.
    """
    from PIL import Image, UnidentifiedImageError

    if _is_pil(x):
        return to_rgb(x)
    if isinstance(x, dict) and ("path" in x or "bytes" in x):  # undecoded datasets Image feature
        if x.get("bytes"):
            import io

            x = io.BytesIO(x["bytes"])
        else:
            x = x["path"]

    def decoded(source, what: str):
        try:
            with Image.open(source) as img:
                img.load()
                return to_rgb(img)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"image {i}: cannot {what} ({err})") from None

    if isinstance(x, (str, os.PathLike)):
        p = resolve(x)
        if not p.is_file():
            raise FileNotFoundError(f"image {i}: file not found: {p}")
        return decoded(p, f"read {p} as an image")
    if hasattr(x, "read"):
        return decoded(x, "decode image bytes")
    raise TypeError(f"image {i} is a {type(x).__name__}; expected a file path or a PIL.Image")


def is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Image.Image)


_is_pil = is_pil


#: the crop scale range of softalign's training augmentation
CROP_SCALE = (0.8, 1.0)


def draw_view_params(generator: torch.Generator | None = None) -> torch.Tensor:
    """One view's ``(s, x, y, flip)``: ``s`` uniform in :data:`CROP_SCALE`, ``x``, ``y`` uniform in [0, 1), flip
    with probability 1/2 (torch's global RNG unless ``generator`` is given)."""
    u = torch.rand(4, generator=generator)
    lo, hi = CROP_SCALE
    return torch.tensor([lo + (hi - lo) * float(u[0]), float(u[1]), float(u[2]), float(u[3] < 0.5)])


def apply_view(image, params):
    """The view ``(s, x, y, flip)`` of a PIL image: crop ``(s w) x (s h)`` at offset ``(x (w - cw), y (h - ch))``
    (integer pixels), then mirror when ``flip``."""
    from PIL import Image

    s, x, y, flip = (float(v) for v in params)
    w, h = image.size
    cw, ch = max(1, int(w * s)), max(1, int(h * s))
    x0, y0 = min(int(x * (w - cw + 1)), w - cw), min(int(y * (h - ch + 1)), h - ch)
    image = image.crop((x0, y0, x0 + cw, y0 + ch))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip >= 0.5 else image
