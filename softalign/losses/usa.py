"""Uni-modal Soft-label Alignment (USA) from CUSA [Huang et al., AAAI 2024], with its uni-modal heads."""
from __future__ import annotations

import torch
from torch import nn

from softalign import functional as SF
from softalign.losses import citations
from softalign.losses._inputs import check_embeddings
from softalign.losses.csa import _config_pair, _pair
from softalign.losses.temperature import Temperature


class ProjectionHead(nn.Sequential):
    """CUSA's projection head: ``Linear(LayerNorm(x))``, ``in_dim -> out_dim``, weights ~ N(0, 0.02), bias 0.

    CUSA [Huang et al., AAAI 2024, Fig. 2] puts one on each backbone's features for the cross-modal (joint)
    space and, in parallel, one more per modality for the uni-modal space that USA trains."""

    def __init__(self, in_dim: int, out_dim: int | None = None):
        out_dim = in_dim if out_dim is None else out_dim
        super().__init__(nn.LayerNorm(int(in_dim)), nn.Linear(int(in_dim), int(out_dim)))
        nn.init.normal_(self[1].weight, std=0.02)
        nn.init.zeros_(self[1].bias)


class UniModalHead(ProjectionHead):
    """CUSA's uni-modal projection: ``Linear(LayerNorm(x))``, ``dim -> dim``, weights ~ N(0, 0.02)."""

    def __init__(self, dim: int):
        super().__init__(dim, dim)


class USALoss(nn.Module):
    """``L_USA = (KL(softmax(T_ii/tau_s) || softmax(S_ii/tau_i)) + KL(softmax(T_tt/tau_s) || softmax(S_tt/tau_t))) / 2``.

    ``S_ii`` / ``S_tt`` are cosine similarities after the uni-modal heads (one per modality, as CUSA, so that
    uni-modal structure does not fight the cross-modal space); ``T_ii``/``T_tt`` are the teacher's. The inputs are
    what the caller passes: in CUSA's layout the backbone features (parallel to the cross-modal head, so USA's
    gradient never reaches it), else the joint embeddings. ``embed_dim`` (int or ``(image_dim, text_dim)``, the
    input dims) creates the heads; ``None`` uses the inputs directly. Temperatures as CUSA: 0.45, learnable in ``[0.1, 1.0]``, one per modality.
    """

    citation = citations.CUSA

    def __init__(self, embed_dim: int | tuple[int, int] | None = None, temperature: float = 0.45,
                 temperature_range: tuple[float, float] = (0.1, 1.0), learn_temperature: bool = True,
                 teacher_temperature: float | tuple[float, float] = 1.0):
        super().__init__()
        if embed_dim is None:
            self.image_head, self.text_head = nn.Identity(), nn.Identity()
        else:
            image_dim, text_dim = (embed_dim, embed_dim) if isinstance(embed_dim, int) else embed_dim
            self.image_head, self.text_head = UniModalHead(int(image_dim)), UniModalHead(int(text_dim))
        self.embed_dim = embed_dim
        rng = temperature_range if learn_temperature else None
        self.image_temperature = Temperature(temperature, rng, learn_temperature)
        self.text_temperature = Temperature(temperature, rng, learn_temperature)
        tau_img, tau_txt = _pair(teacher_temperature)
        self.teacher_temperature = Temperature(tau_img, None, learnable=False)
        self.text_teacher_temperature = Temperature(tau_txt, None, learnable=False)

    def set_teacher_temperatures(self, image: float, text: float) -> None:
        """Soft-label temperatures of the image-image and text-text teacher matrices (frozen)."""
        self.teacher_temperature.set_frozen_value(image)
        self.text_teacher_temperature.set_frozen_value(text)

    def uni_modal_similarities(self, image_emb: torch.Tensor, text_emb: torch.Tensor):
        return self._uni_modal_similarities(image_emb, text_emb, fused=False)

    def _uni_modal_similarities(self, image_emb, text_emb, fused: bool):
        image_emb, text_emb = check_embeddings(image_emb, text_emb, same_dim=False)
        dtype = self._head_dtype()
        image = self.image_head(image_emb.to(dtype)).float()
        text = self.text_head(text_emb.to(dtype)).float()
        if fused:  # same values; one fused autograd node per modality (no double backward)
            image, text = SF.as_float(image, "a"), SF.as_float(text, "a")
            return SF._self_cosine_similarity(image), SF._self_cosine_similarity(text)
        return SF.cosine_similarity_matrix(image), SF.cosine_similarity_matrix(text)

    def _head_dtype(self):
        for p in self.parameters():
            if p.dim() > 0:
                return p.dtype
        return torch.float32

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, *, teacher_image_sim: torch.Tensor,
                teacher_text_sim: torch.Tensor, image_sim=None, text_sim=None, **unused) -> torch.Tensor:
        """``image_sim`` / ``text_sim``: the student's ``[B, B]`` uni-modal cosine similarities of the raw
        embeddings, if the caller already has them; used only without heads (``embed_dim=None``)."""
        if self.embed_dim is None and image_sim is not None and text_sim is not None:
            s_ii, s_tt = image_sim, text_sim
        else:
            fused = type(self).uni_modal_similarities is USALoss.uni_modal_similarities  # not overridden
            s_ii, s_tt = self._uni_modal_similarities(image_emb, text_emb, fused=True) if fused \
                else self.uni_modal_similarities(image_emb, text_emb)
        return SF.uni_modal_soft_label_alignment(
            s_ii, s_tt, teacher_image_sim, teacher_text_sim,
            (self.image_temperature(), self.text_temperature()),
            (self.teacher_temperature(), self.text_teacher_temperature()))

    def get_config_dict(self) -> dict:
        t = self.image_temperature
        return {"embed_dim": self.embed_dim, "temperature": float(t.value), "temperature_range": (t.low, t.high),
                "learn_temperature": t.learnable, "teacher_temperature": _config_pair(self.teacher_temperature, self.text_teacher_temperature)}
