"""Cross-modal Soft-label Alignment (CSA) from CUSA [Huang et al., AAAI 2024]."""

from __future__ import annotations

import torch
from torch import nn

from softalign import functional as SF
from softalign.losses import citations
from softalign.losses._inputs import ChecksValuesOnce, default_similarity, resolve_scores
from softalign.losses.temperature import ClampedTemperature


class CSALoss(ChecksValuesOnce, nn.Module):
    """``L_CSA = (KL(softmax(T_i2t/tau_s) || softmax(S/tau_c)) + KL(softmax(T_t2i/tau_s) || softmax(S^T/tau_c))) / 2``.

    ``S`` are the student's image-text scores (from embeddings, or a precomputed ``[B, B]`` matrix from a
    cross-attention scorer); the soft labels ``T`` are the teacher's uni-modal similarities of the same pairs
    (mode ``each``: image->text rows use teacher image-image, text->image rows teacher text-text; ``add`` and
    ``dot`` fuse both, see :func:`softalign.functional.combine_teacher_similarities`).

    Defaults as CUSA: ``tau_c = 0.45`` learnable in ``[0.1, 0.99]``, ``tau_s = 1.0`` frozen.
    ``teacher_temperature`` may be an ``(image, text)`` pair: ``tau_s`` of the i2t rows (teacher image-image
    matrix, mode ``each``) and of the t2i rows (text-text); :class:`~softalign.losses.SoftAlignLoss` sets
    calibrated values (:mod:`softalign.soft_labels`) through :meth:`set_teacher_temperatures`.
    ``separate_temperatures=True`` learns one ``tau_c`` per direction (CUSA's ``use_same_tau: False``).
    """

    citation = citations.CUSA

    def __init__(
        self,
        mode: str = "each",
        temperature: float = 0.45,
        temperature_range: tuple[float, float] = (0.1, 0.99),
        learn_temperature: bool = True,
        teacher_temperature: float | tuple[float, float] = 1.0,
        separate_temperatures: bool = False,
        similarity=None,
    ):
        super().__init__()
        if mode not in SF.CSA_MODES:
            raise ValueError(f"mode must be one of {SF.CSA_MODES}, got {mode!r}")
        self.mode = mode
        rng = temperature_range if learn_temperature else None
        self.temperature = ClampedTemperature(temperature, rng, learn_temperature)
        self.text_temperature = (
            ClampedTemperature(temperature, rng, learn_temperature) if separate_temperatures else None
        )
        tau_img, tau_txt = _pair(teacher_temperature)
        self.teacher_temperature = ClampedTemperature(tau_img, None, learnable=False)
        self.text_teacher_temperature = ClampedTemperature(tau_txt, None, learnable=False)
        self.similarity = similarity if similarity is not None else default_similarity()

    def temperatures(self):
        t_image = self.temperature()
        return (t_image, self.text_temperature() if self.text_temperature is not None else t_image)

    def set_teacher_temperatures(self, image: float, text: float) -> None:
        self.teacher_temperature.set_frozen_value(image)
        self.text_teacher_temperature.set_frozen_value(text)

    def teacher_temperatures(self):
        return (self.teacher_temperature(), self.text_teacher_temperature())

    def forward(
        self,
        image_emb=None,
        text_emb=None,
        *,
        scores=None,
        teacher=None,
        targets=None,
    ) -> torch.Tensor:
        """``teacher``: ``TeacherSimilarities(image, text)``, the teacher's ``[B, B]`` image-image and text-text
        similarities; ``targets``: the ``(i2t, t2i)`` soft labels (:func:`softalign.functional.soft_labels`)
        computed once by the caller instead."""
        validate = self._take_value_check()
        scores = resolve_scores(image_emb, text_emb, scores, self.similarity, validate)
        if targets is None:
            b = scores.shape[0]
            if teacher is None:
                raise ValueError(
                    "pass teacher=TeacherSimilarities(image, text) ([B, B] each), or targets (the soft labels)"
                )
            t_img = SF.check_square_pair(teacher[0], "TeacherSimilarities.image", b, validate)
            t_txt = SF.check_square_pair(teacher[1], "TeacherSimilarities.text", b, validate)
            targets = self.soft_labels(t_img, t_txt)
        return self._checked(
            SF.cross_modal_soft_label_alignment(
                scores, None, None, self.temperatures(), mode=self.mode, targets=targets, validate=False
            )
        )

    def soft_labels(self, teacher_image_sim: torch.Tensor, teacher_text_sim: torch.Tensor):
        """The ``(i2t, t2i)`` soft labels of this term: the (mode-combined) teacher matrices at its ``tau_s``."""
        fused_i2t, fused_t2i = SF.combine_teacher_similarities(teacher_image_sim, teacher_text_sim, self.mode)
        tau_i, tau_t = self.teacher_temperatures()
        return (SF.soft_labels(fused_i2t, tau_i, validate=False), SF.soft_labels(fused_t2i, tau_t, validate=False))

    def get_config_dict(self) -> dict:
        t = self.temperature
        return {
            "mode": self.mode,
            "temperature": float(t.value),
            "temperature_range": (t.low, t.high),
            "learn_temperature": t.learnable,
            "teacher_temperature": _config_pair(self.teacher_temperature, self.text_teacher_temperature),
            "separate_temperatures": self.text_temperature is not None,
        }


def _pair(value) -> tuple[float, float]:
    """A temperature or an ``(image, text)`` pair of them -> ``(image, text)`` floats."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"teacher_temperature pair must be (image, text), got {value!r}")
        return float(value[0]), float(value[1])
    return float(value), float(value)


def _config_pair(image: ClampedTemperature, text: ClampedTemperature):
    a, b = float(image.value), float(text.value)
    return a if a == b else (a, b)
