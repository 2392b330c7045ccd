"""Uni-modal Soft-label Alignment (USA) from CUSA [Huang et al., AAAI 2024], with its uni-modal heads."""

from __future__ import annotations

import torch
from torch import nn

from softalign import functional as SF
from softalign.losses import citations
from softalign.losses._inputs import ChecksValuesOnce, check_embeddings
from softalign.losses.csa import _config_pair, _pair
from softalign.losses.temperature import ClampedTemperature


class ProjectionHead(nn.Sequential):
    """CUSA's projection head: ``Linear(LayerNorm(x))``, ``in_dim -> out_dim``, weights ~ N(0, 0.02), bias 0.

    CUSA [Huang et al., AAAI 2024, Fig. 2] puts one on each backbone's features for the cross-modal (joint)
    space and, in parallel, one more per modality for the uni-modal space that USA trains."""

    def __init__(self, in_dim: int, out_dim: int | None = None):
        out_dim = in_dim if out_dim is None else out_dim
        linear = nn.Linear(int(in_dim), int(out_dim))
        nn.init.normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
        super().__init__(nn.LayerNorm(int(in_dim)), linear)


class UniModalHead(ProjectionHead):
    """CUSA's uni-modal projection: ``Linear(LayerNorm(x))``, ``dim -> dim``, weights ~ N(0, 0.02). An input of
    another width is an error naming ``embed_dim`` and both sizes (a shape check: no host sync)."""

    def __init__(self, dim: int, modality: str = "image"):
        super().__init__(dim, dim)
        self.dim, self.modality = int(dim), modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            which = "embed_dim" if self.modality == "image" else "embed_dim (the text side of an (image, text) pair)"
            raise ValueError(
                f"USA's {self.modality} head was built for {self.dim}-d inputs ({which} = {self.dim}) "
                f"but the {self.modality} inputs are {x.shape[-1]}-d: build the loss with the width of "
                f"what you pass (embed_dim=D, or (D_image, D_text) for image_features / text_features)"
            )
        return super().forward(x)


class USALoss(ChecksValuesOnce, nn.Module):
    """``L_USA = (KL(softmax(T_ii/tau_s) || softmax(S_ii/tau_i)) + KL(softmax(T_tt/tau_s) || softmax(S_tt/tau_t))) / 2``.

    ``S_ii`` / ``S_tt`` are cosine similarities after the uni-modal heads (one per modality, as CUSA, so that
    uni-modal structure does not fight the cross-modal space); ``T_ii``/``T_tt`` are the teacher's. The inputs are
    what the caller passes: in CUSA's layout the backbone features (parallel to the cross-modal head, so USA's
    gradient never reaches it), else the joint embeddings. ``embed_dim`` (int or ``(image_dim, text_dim)``, the
    input dims) creates the heads; ``None`` uses the inputs directly. Temperatures as CUSA: 0.45, learnable in ``[0.1, 1.0]``, one per modality.
    """

    citation = citations.CUSA

    def __init__(
        self,
        embed_dim: int | tuple[int, int] | None = None,
        temperature: float = 0.45,
        temperature_range: tuple[float, float] = (0.1, 1.0),
        learn_temperature: bool = True,
        teacher_temperature: float | tuple[float, float] = 1.0,
    ):
        super().__init__()
        self.image_head: nn.Module
        self.text_head: nn.Module
        if embed_dim is None:
            self.image_head, self.text_head = nn.Identity(), nn.Identity()
        else:
            image_dim, text_dim = (embed_dim, embed_dim) if isinstance(embed_dim, int) else embed_dim
            self.image_head = UniModalHead(int(image_dim), "image")
            self.text_head = UniModalHead(int(text_dim), "text")
        self.embed_dim = embed_dim
        rng = temperature_range if learn_temperature else None
        self.image_temperature = ClampedTemperature(temperature, rng, learn_temperature)
        self.text_temperature = ClampedTemperature(temperature, rng, learn_temperature)
        tau_img, tau_txt = _pair(teacher_temperature)
        self.teacher_temperature = ClampedTemperature(tau_img, None, learnable=False)
        self.text_teacher_temperature = ClampedTemperature(tau_txt, None, learnable=False)

    def set_teacher_temperatures(self, image: float, text: float) -> None:
        """Soft-label temperatures of the image-image and text-text teacher matrices (frozen)."""
        self.teacher_temperature.set_frozen_value(image)
        self.text_teacher_temperature.set_frozen_value(text)

    def uni_modal_similarities(self, image_emb: torch.Tensor, text_emb: torch.Tensor):
        """Cosine similarities ``(S_ii, S_tt)`` of the uni-modal heads' outputs (the student side of USA)."""
        return self._uni_modal_similarities(image_emb, text_emb)

    def _uni_modal_similarities(self, image_emb, text_emb, validate: bool = True):
        image_emb, text_emb = check_embeddings(image_emb, text_emb, same_dim=False, validate=validate)
        dtype = self._head_dtype(image_emb.dtype)
        image = self.image_head(image_emb.to(dtype)).to(image_emb.dtype)
        text = self.text_head(text_emb.to(dtype)).to(text_emb.dtype)
        return (SF.cosine_similarity_matrix(image, validate=False), SF.cosine_similarity_matrix(text, validate=False))

    def _head_dtype(self, default: torch.dtype = torch.float32):
        """The heads' parameter dtype (inputs are cast to it); without heads, ``default`` (the input's own)."""
        for p in self.parameters():
            if p.dim() > 0:
                return p.dtype
        return default

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        *,
        teacher=None,
        image_sim=None,
        text_sim=None,
        targets=None,
    ) -> torch.Tensor:
        """``image_sim`` / ``text_sim``: the student's ``[B, B]`` uni-modal cosine similarities of the raw
        embeddings, if the caller already has them; used only without heads (``embed_dim=None``). ``targets``: the
        ``(image, text)`` soft labels computed once by the caller (:func:`softalign.functional.soft_labels`)."""
        validate = self._take_value_check()
        if self.embed_dim is None and image_sim is not None and text_sim is not None:
            s_ii, s_tt = image_sim, text_sim
        elif type(self).uni_modal_similarities is USALoss.uni_modal_similarities:  # not overridden
            s_ii, s_tt = self._uni_modal_similarities(image_emb, text_emb, validate)
        else:
            s_ii, s_tt = self.uni_modal_similarities(image_emb, text_emb)
        if targets is None:
            b = s_ii.shape[0]
            if teacher is None:
                raise ValueError(
                    "pass teacher=TeacherSimilarities(image, text) ([B, B] each), or targets (the soft labels)"
                )
            targets = self.soft_labels(
                SF.check_square_pair(teacher[0], "TeacherSimilarities.image", b, validate),
                SF.check_square_pair(teacher[1], "TeacherSimilarities.text", b, validate),
            )
        return self._checked(
            SF.uni_modal_soft_label_alignment(
                s_ii,
                s_tt,
                None,
                None,
                (self.image_temperature(), self.text_temperature()),
                targets=targets,
                validate=False,
            )
        )

    def soft_labels(self, teacher_image_sim: torch.Tensor, teacher_text_sim: torch.Tensor):
        """The ``(image, text)`` soft labels of this term: the teacher matrices at its ``tau_s``."""
        return (
            SF.soft_labels(teacher_image_sim, self.teacher_temperature(), validate=False),
            SF.soft_labels(teacher_text_sim, self.text_teacher_temperature(), validate=False),
        )

    def get_config_dict(self) -> dict:
        t = self.image_temperature
        return {
            "embed_dim": self.embed_dim,
            "temperature": float(t.value),
            "temperature_range": (t.low, t.high),
            "learn_temperature": t.learnable,
            "teacher_temperature": _config_pair(self.teacher_temperature, self.text_teacher_temperature),
        }
