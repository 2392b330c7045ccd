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

from softalign.images import _INTERP, ImagePreprocessing, to_rgb  # noqa: E402,F401  (the shared pipeline)


def efficientnet_lite_preprocessing(image_size: int = 224) -> ImagePreprocessing:
    return ImagePreprocessing(
        size=(image_size, image_size),
        resize_shorter=int(math.floor(image_size / 0.875)),
        interpolation="bicubic",
        mean=(127.0,) * 3,
        std=(128.0,) * 3,
        scale=255.0,
    )


def from_timm_data_config(cfg: dict) -> ImagePreprocessing:
    """timm data config (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``) -> transform."""
    _, h, w = tuple(cfg.get("input_size", (3, 224, 224)))
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    interp = str(cfg.get("interpolation") or "bicubic")
    if interp not in _INTERP:
        interp = "bicubic"
    return ImagePreprocessing(
        size=(int(h), int(w)),
        resize_shorter=int(math.floor(min(h, w) / crop_pct)),
        interpolation=interp,
        mean=tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225))),
        scale=1.0,
    )
