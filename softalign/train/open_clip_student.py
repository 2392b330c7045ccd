"""open_clip students: ``model.image_encoder: open_clip:<arch>[/<pretrained>]`` with ``model.text_encoder: open_clip``.

CUSA [Huang et al., AAAI 2024] fine-tunes the whole CLIP: both towers train, their outputs (``encode_image`` /
``encode_text``, before normalisation) are the backbone features, a cross-modal head (``LayerNorm -> Linear``,
``embed_dim -> embed_dim``) maps each into the joint space, and USA's uni-modal heads run in parallel on the same
features (they live in the loss). CLIP's ``logit_scale`` is frozen: the loss has its own temperature, as CUSA's.

Images go through open_clip's own preprocessing (``create_model_and_transforms``: the training transform for
training, the validation transform for evaluation) and captions through ``open_clip.get_tokenizer(arch)``.
``pretrained`` names open_clip weights (``openai``, ``laion2b_s34b_b79k``, ... or a local file); without it the
model is randomly initialised. With ``model.pretrained: false`` the tag is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from softalign.train.models import DualEncoder

PREFIX = "open_clip:"


def import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            f"model.image_encoder 'open_clip:<arch>' needs open_clip ({err}): pip install "
            "'softalign[clip]' (open_clip needs a torchvision build that matches your torch)"
        ) from None
    return open_clip


def parse_open_clip_name(name: str) -> tuple[str, str | None]:
    """``"open_clip:ViT-B-32/openai"`` -> ``("ViT-B-32", "openai")``; the tag is optional."""
    spec = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    arch, _, tag = spec.partition("/")
    if not arch:
        raise ValueError(
            f"model.image_encoder {name!r}: expected 'open_clip:<arch>[/<pretrained>]', "
            "e.g. 'open_clip:ViT-B-32/openai'"
        )
    return arch, (tag or None)


class OpenCLIPImageTransform:
    """A path or PIL image -> open_clip's preprocessing (RGB, transparency composited on white)."""

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        from softalign.images import to_rgb

        if not isinstance(image, Image.Image):
            with Image.open(image) as im:
                image = im.copy()
        return self.preprocess(to_rgb(image))


class OpenCLIPDualEncoder(DualEncoder):
    """An open_clip model's two towers as a :class:`~softalign.train.models.DualEncoder` (CUSA's layout)."""

    def __init__(
        self,
        name: str,
        embed_dim: int,
        pretrained: bool = True,
        finetune_image: bool = True,
        finetune_text: bool = True,
    ):
        open_clip = import_open_clip()
        arch, tag = parse_open_clip_name(name)
        if arch not in open_clip.list_models():
            raise ValueError(
                f"model.image_encoder {name!r}: open_clip has no architecture {arch!r} (see "
                "open_clip.list_models(), e.g. ViT-B-32, ViT-L-14-336)"
            )
        clip, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            arch, pretrained=tag if pretrained else None
        )
        cfg: dict[str, Any] = open_clip.get_model_config(arch) or {}
        dim = int(cfg["embed_dim"])
        super().__init__(nn.Identity(), nn.Identity(), embed_dim, feature_dims=(dim, dim))
        self.clip = clip
        for frozen in ("logit_scale", "logit_bias"):  # the loss's temperature replaces CLIP's scale
            p = getattr(clip, frozen, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)
        clip.visual.requires_grad_(bool(finetune_image))
        for n, p in clip.named_parameters():
            if not n.startswith("visual.") and n not in ("logit_scale", "logit_bias"):
                p.requires_grad_(bool(finetune_text))
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.arch, self.pretrained_tag = arch, (tag if pretrained else None)
        self._transforms = {
            True: OpenCLIPImageTransform(preprocess_train),
            False: OpenCLIPImageTransform(preprocess_val),
        }

    def image_transform(self, train: bool) -> OpenCLIPImageTransform:
        """open_clip's own preprocessing: its training transform, or its validation transform."""
        return self._transforms[bool(train)]

    def image_features(self, images) -> torch.Tensor:
        return self.clip.encode_image(images).float()

    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        device = next(self.clip.parameters()).device
        tokens = self.tokenizer(list(captions)).to(device)
        return self.clip.encode_text(tokens).float()
