"""Shared input handling: embeddings or a precomputed score matrix, validated and upcast to fp32."""

from __future__ import annotations

import torch

from softalign.functional import as_float, check_square_pair


class ChecksValuesOnce:
    """Mixin of the loss modules. The inputs' value check (NaN/inf/overflow, :func:`softalign.functional.
    check_values`, a host-device sync that names the bad input) runs on the first forward, or on every one with
    ``check_values_always = True``; shapes and dtypes are checked on every call (no sync). On every call the loss
    value itself must be finite: :func:`assert_finite` raises on NaN/inf without a host sync (``torch._assert_async``:
    at once on the CPU, at the next synchronisation on an accelerator), so later NaN inputs, overflow or a NaN
    temperature never pass silently. A module inside :class:`~softalign.losses.SoftAlignLoss` leaves both to the
    combined loss, which checks at its boundary."""

    check_values_always: bool = False
    _values_checked: bool = False
    _owned: bool = False  # a term of a SoftAlignLoss: the owner checks

    def _take_value_check(self) -> bool:
        """Whether this call checks its inputs' values; a forward that passed marks them checked (:meth:`_checked`)."""
        return self.check_values_always or not self._values_checked

    def _checked(self, out):
        self._values_checked = True
        if not self._owned:
            assert_finite(out, type(self).__name__)
        return out


def assert_finite(loss: torch.Tensor, name: str) -> None:
    """Raise (``RuntimeError``) when the scalar ``loss`` is NaN or inf, without a host sync: ``torch._assert_async``
    checks on the device; on the CPU it raises at once."""
    torch._assert_async(
        torch.isfinite(loss.detach()).all(),
        f"{name}: the loss is not finite (NaN or inf): an input (embeddings, scores, teacher "
        "similarities) or a temperature holds NaN/inf, or the embeddings overflow; set "
        "check_values_always = True on the loss to have the bad input named",
    )


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


def check_embeddings(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    same_dim: bool = True,
    names=("image_emb", "text_emb"),
    validate: bool = True,
):
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


class CosineSimilarity(torch.nn.Module):
    """``S = normalize(a) normalize(b)^T`` (L2 over dim 1, fp32): the loss modules' default similarity, with torch
    alone. It equals pytorch-metric-learning's default ``CosineSimilarity()``, which a user may pass instead
    (``similarity=``), as any PML distance; PML is then the user's own install (``pip install 'softalign[eval]'``)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).t()


def default_similarity() -> CosineSimilarity:
    return CosineSimilarity()


def is_plain_cosine(similarity) -> bool:
    """True for the default cosine (softalign's, or PML's default ``CosineSimilarity``): the loss may then compute
    the scores and the uni-modal similarities from one normalisation (exact). PML is looked up only when the
    caller already imported it."""
    if type(similarity) is CosineSimilarity:
        return True
    import sys

    pml = sys.modules.get("pytorch_metric_learning.distances")
    return (
        pml is not None
        and type(similarity) is pml.CosineSimilarity
        and similarity.normalize_embeddings
        and similarity.p == 2
        and similarity.power == 1
        and not getattr(similarity, "collect_stats", False)
    )
