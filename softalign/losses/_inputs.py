"""Shared input handling: embeddings or a precomputed score matrix, validated and upcast to fp32."""
from __future__ import annotations

import torch

from softalign.functional import as_float, check_square_pair


class ChecksValuesOnce:
    """Mixin of the loss modules: the value check (NaN/inf/overflow, :func:`softalign.functional.check_values`, a
    host-device sync) runs on the first forward, or on every one with ``check_values_always = True``; shapes and
    dtypes are checked on every call (no sync). A module inside :class:`~softalign.losses.SoftAlignLoss` never
    checks: the combined loss checks its inputs once, at its boundary."""

    check_values_always: bool = False
    _values_checked: bool = False

    def _take_value_check(self) -> bool:
        """Whether this call checks its inputs' values; a forward that passed marks them checked (:meth:`_checked`)."""
        return self.check_values_always or not self._values_checked

    def _checked(self, out):
        self._values_checked = True
        return out


def resolve_scores(
    image_emb: torch.Tensor | None,
    text_emb: torch.Tensor | None,
    scores: torch.Tensor | None,
    similarity,
    validate: bool = True,
) -> torch.Tensor:
    """Return the fp32 ``[B, B]`` image x caption scores, from ``scores`` or from the two embeddings."""
    if scores is not None:
        return check_square_pair(scores, "scores", validate=validate)
    if image_emb is None or text_emb is None:
        raise ValueError("pass either image_emb and text_emb ([B, D] each) or scores ([B, B] images x captions)")
    image_emb, text_emb = check_embeddings(image_emb, text_emb, validate=validate)
    return similarity(image_emb, text_emb)


def check_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, same_dim: bool = True,
                     names=("image_emb", "text_emb"), validate: bool = True):
    a, b = names
    image_emb = as_float(image_emb, a, validate)
    text_emb = as_float(text_emb, b, validate)
    if image_emb.dim() != 2 or text_emb.dim() != 2:
        raise ValueError(f"{a} and {b} must be [B, D], got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(
            f"{a} has {image_emb.shape[0]} rows but {b} has {text_emb.shape[0]}: a batch holds B "
            "(image, caption) pairs, one image row per caption"
        )
    if same_dim and image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"{a} dim {image_emb.shape[1]} != {b} dim {text_emb.shape[1]}")
    return image_emb, text_emb


def default_similarity():
    """pytorch-metric-learning's cosine similarity (normalises embeddings, returns the [B, B] matrix)."""
    from pytorch_metric_learning.distances import CosineSimilarity

    return CosineSimilarity()
