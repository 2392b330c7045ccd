"""Pure functions over similarity matrices: the formulas behind every softalign loss.

Conventions
-----------
* A batch holds ``B`` (image, caption) pairs. A cross-modal score matrix ``S`` is ``[B, B]`` with
  images as rows and captions as columns, so ``S[p, p]`` is the score of pair ``p``.
* ``image_ids`` (``[B]`` int) says which image each pair shows. Pairs that share an image id are
  positives of each other and are never used as negatives ("positives come from ids").
* Every function upcasts its inputs to float32 (float64 stays float64) and, with ``validate=True`` (the default),
  rejects non-finite or overflowing values. That check is the only host-device sync: the loss modules run it once,
  at their boundary, and call these functions with ``validate=False``.
* Plain autograd throughout: gradients of any order, ``torch.func`` transforms and ``torch.compile`` work.

References
----------
* [VSE++] Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives", BMVC 2018.
* [CUSA] Huang et al., "Cross-modal and Uni-modal Soft-label Alignment for Image-Text Retrieval", AAAI 2024.
* [TGDT] Liu et al., "Efficient Token-Guided Image-Text Retrieval with Consistent Multimodal Contrastive
  Training", IEEE TIP 2023 (arXiv:2306.08789): the Consistent Multimodal Contrastive (CMC) loss adds an
  intra-modal consistency term to the VSE++ hinge.
* [CLIP/InfoNCE] van den Oord et al., "Representation Learning with Contrastive Predictive Coding", 2018;
  Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

Number = float | torch.Tensor

CSA_MODES = ("each", "add", "dot")

__all__ = [
    "CSA_MODES",
    "MinedNegatives",
    "as_float",
    "check_values",
    "SoftLabels",
    "soft_labels",
    "cosine_similarities",
    "check_square_pair",
    "cosine_similarity_matrix",
    "positive_mask",
    "soft_label_kl",
    "soft_label_kl_rows",
    "cross_modal_soft_label_alignment",
    "uni_modal_soft_label_alignment",
    "combine_teacher_similarities",
    "vsepp_hinge",
    "vsepp_hinge_rows",
    "info_nce",
    "info_nce_rows",
    "intra_modal_consistency",
    "intra_modal_consistency_rows",
    "consistent_multimodal_contrastive",
]


class MinedNegatives(NamedTuple):
    """Boolean masks of the negatives a loss may use.

    ``i2t[i, k]``: caption ``k`` is a negative for image anchor ``i``.
    ``t2i[k, j]``: image ``k`` is a negative for caption anchor ``j`` (same orientation as the scores).
    """

    i2t: torch.Tensor
    t2i: torch.Tensor


# ----------------------------------------------------------------------------------------------
# validation helpers


def check_values(x: torch.Tensor, name: str) -> None:
    """Raise unless every value of ``x`` is finite and no norm or dot product of them overflows.

    One reduction on the common path (a host sync): the sum of squares is finite iff every element is finite and
    nothing squares past the dtype's range (``|x| ~ 1e19`` in fp32, where the loss would silently turn NaN); the
    error path then tells the two apart."""
    if torch.isfinite(x.detach().square().sum()):
        return
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} contains non-finite values (first at index {tuple(bad)})")
    big = float(x.detach().abs().max())
    raise ValueError(
        f"{name} holds values too large for {str(x.dtype).replace('torch.', '')} (max |x| = "
        f"{big:.3g}): their squares and dot products overflow to inf and the loss would be NaN. "
        "Normalise or rescale the embeddings (e.g. F.normalize(x, dim=-1))"
    )


def as_float(x: torch.Tensor, name: str, validate: bool = True) -> torch.Tensor:
    """Upcast ``x`` to at least float32; with ``validate`` also :func:`check_values` (``name`` is in the error).
    Type checks never sync with the device; the value check does (once)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != torch.float64:
        x = x.float()
    if validate:
        check_values(x, name)
    return x


def check_square_pair(x: torch.Tensor, name: str, batch: int | None = None, validate: bool = True) -> torch.Tensor:
    """Check the shape of a ``[B, B]`` matrix (optionally with a known ``B``), upcast it, and with ``validate``
    its values."""
    x = as_float(x, name, validate)
    if x.dim() != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be a square [B, B] matrix, got shape {tuple(x.shape)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but the batch has {batch} pairs; expected [{batch}, {batch}]"
        )
    return x


def _temperature(t: Number, name: str, validate: bool = True) -> Number:
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(t.shape)}")
        if not validate:  # e.g. a clamped Temperature module: valid by construction, and no host sync
            return t.float() if t.dtype != torch.float64 else t
        value = t.detach().item()  # one read instead of several reductions (a NaN fails "> 0")
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
        return t.float() if t.dtype != torch.float64 else t
    t = float(t)
    if not t > 0 or t != t or t == float("inf"):
        raise ValueError(f"{name} must be finite and > 0, got {t}")
    return t


# ----------------------------------------------------------------------------------------------
# similarities and masks


def cosine_similarity_matrix(
    a: torch.Tensor, b: torch.Tensor | None = None, eps: float = 1e-8, validate: bool = True
) -> torch.Tensor:
    """``S[i, j] = <a_i, b_j> / (|a_i| |b_j|)``, computed in float32 (``b`` defaults to ``a``)."""
    a = as_float(a, "a", validate)
    other = a if b is None else as_float(b, "b", validate)
    if a.dim() != 2 or other.dim() != 2 or a.shape[1] != other.shape[1]:
        raise ValueError(f"embeddings must be [N, D] with equal D, got {tuple(a.shape)} and {tuple(other.shape)}")
    a = F.normalize(a, dim=1, eps=eps)
    other = a if b is None else F.normalize(other, dim=1, eps=eps)
    return a @ other.t()


def cosine_similarities(image_emb: torch.Tensor, text_emb: torch.Tensor, uni: bool, eps: float = 1e-12):
    """Cosine scores ``S_it`` and, with ``uni``, the uni-modal ``S_ii`` / ``S_tt`` of checked ``[B, D]`` embeddings,
    normalised once (``F.normalize(., dim=1, eps=eps)``) and shared by the three products (plain autograd)."""
    y_img, y_txt = F.normalize(image_emb, dim=1, eps=eps), F.normalize(text_emb, dim=1, eps=eps)
    scores = y_img @ y_txt.t()
    if not uni:
        return scores, None, None
    return scores, y_img @ y_img.t(), y_txt @ y_txt.t()


def positive_mask(row_ids: torch.Tensor, col_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``M[i, j] = row_ids[i] == col_ids[j]`` (bool): pairs showing the same image are positives."""
    if col_ids is None:
        col_ids = row_ids
    if row_ids.dim() != 1 or col_ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shapes {tuple(row_ids.shape)} and {tuple(col_ids.shape)}")
    return row_ids.view(-1, 1) == col_ids.view(1, -1)


def _check_image_ids(batch: int, image_ids: torch.Tensor) -> None:
    if image_ids.shape != (batch,):
        raise ValueError(f"image_ids must have shape [{batch}] (one id per pair), got {tuple(image_ids.shape)}")


def _pair_positive_mask(batch: int, image_ids: torch.Tensor | None, device) -> torch.Tensor:
    if image_ids is None:
        return torch.eye(batch, dtype=torch.bool, device=device)
    _check_image_ids(batch, image_ids)
    return positive_mask(image_ids.to(device))


# ----------------------------------------------------------------------------------------------
# soft-label alignment (CUSA)


class SoftLabels(NamedTuple):
    """A soft-label target ``P = softmax(T / tau_s)`` (``[b, B]`` rows) and ``sum_ij P_ij log P_ij`` (a scalar, from
    ``log_softmax``: finite, so a ``P_ij`` that underflows to 0 adds exactly 0). The KL needs no other block of the
    target: :func:`soft_label_kl_rows`."""

    probs: torch.Tensor
    neg_entropy: torch.Tensor


def soft_labels(
    teacher: torch.Tensor, teacher_temperature: Number = 1.0, dtype: torch.dtype | None = None, validate: bool = True
) -> SoftLabels:
    """``softmax(teacher / teacher_temperature)`` row-wise [CUSA, Eq. 3]: the teacher carries no gradient, a
    learnable ``teacher_temperature`` does. Compute it once per teacher matrix and pass it to
    :func:`soft_label_kl` (``target=``) for every term that uses it, as :class:`~softalign.losses.SoftAlignLoss`
    does for CSA and USA."""
    teacher = as_float(teacher, "teacher similarities", validate)
    tau = _temperature(teacher_temperature, "teacher_temperature", validate)
    t = teacher.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    log_probs = F.log_softmax(t / tau, dim=1)
    probs = log_probs.exp()
    return SoftLabels(probs, row_dots(probs, log_probs).sum())


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[sum_j a_ij b_ij]_i`` as one batched matrix product: no ``[b, B]`` product block, row sums accumulated by
    the matmul kernel (plain autograd)."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def soft_label_kl_rows(logits: torch.Tensor, target: SoftLabels) -> torch.Tensor:
    """``sum_i KL(P_i || softmax(logits_i))`` over the rows of ``[b, B]`` logits (the student's scores over its
    temperature) [CUSA, Eq. 4], the one code path of every soft-label term.

    As ``sum_j P_ij = 1``: ``KL_i = sum_j P_ij log P_ij + logsumexp_j(z_ij) - sum_j P_ij z_ij``, so autograd keeps
    the logits and ``P`` only (no ``log Q`` block); ``d/dz = softmax(z) - P``. Plain autograd."""
    return target.neg_entropy + torch.logsumexp(logits, dim=1).sum() - row_dots(target.probs, logits).sum()


def soft_label_kl(
    student: torch.Tensor,
    teacher: torch.Tensor | None = None,
    temperature: Number = 1.0,
    teacher_temperature: Number = 1.0,
    *,
    target: SoftLabels | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Row-wise soft-label KL divergence, averaged over rows ("batchmean") [CUSA, Eq. 3-4].

    ``KL(P || Q) = 1/B sum_i sum_j P_ij (log P_ij - log Q_ij)`` with
    ``P = softmax(teacher / teacher_temperature)`` (the soft label, no gradient to the teacher) and
    ``Q = softmax(student / temperature)``; terms with ``P_ij = 0`` contribute 0. ``target``: the soft label
    computed once by :func:`soft_labels` (then ``teacher`` / ``teacher_temperature`` are not used). Plain autograd:
    ``d/dS = (Q - P) / (temperature * B)``; higher-order gradients and ``torch.func`` transforms work.
    """
    student = as_float(student, "student similarities", validate)
    if target is None:
        if teacher is None:
            raise ValueError(
                "pass the teacher similarities or a precomputed target (softalign.functional.soft_labels)"
            )
        teacher = as_float(teacher, "teacher similarities", validate)
        if teacher.shape != student.shape:
            raise ValueError(
                f"student and teacher similarities must be 2-D and of equal shape, got "
                f"{tuple(student.shape)} and {tuple(teacher.shape)}"
            )
        target = soft_labels(teacher, teacher_temperature, student.dtype, validate)
    if student.dim() != 2 or target.probs.shape != student.shape:
        raise ValueError(
            f"student and teacher similarities must be 2-D and of equal shape, got "
            f"{tuple(student.shape)} and {tuple(target.probs.shape)}"
        )
    temperature = _temperature(temperature, "temperature", validate)
    return soft_label_kl_rows(student / temperature, target) / student.shape[0]


def combine_teacher_similarities(
    image_sim: torch.Tensor, text_sim: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-label targets for the (i2t, t2i) rows of CSA [CUSA, Sec. 3.2 and the authors' modes].

    * ``each``: i2t rows use the teacher image-image similarities, t2i rows the text-text ones;
    * ``add``:  both use ``(S_img + S_txt) / 2``;
    * ``dot``:  both use ``sqrt(max(S_img, 0) * max(S_txt, 0))``.
    """
    if mode == "each":
        return image_sim, text_sim
    if mode == "add":
        both = (image_sim + text_sim) / 2.0
        return both, both
    if mode == "dot":
        both = torch.sqrt(image_sim.clamp(min=0) * text_sim.clamp(min=0))
        return both, both
    raise ValueError(f"csa mode must be one of {CSA_MODES}, got {mode!r}")


def _pair_targets(
    teacher_image_sim, teacher_text_sim, teacher_temperature, batch: int, dtype, validate: bool, mode: str = "each"
) -> tuple[SoftLabels, SoftLabels]:
    """The two soft labels of CSA (``mode``-combined) or USA (``mode="each"``) from the teacher matrices."""
    if teacher_image_sim is None or teacher_text_sim is None:
        raise ValueError("pass teacher_image_sim and teacher_text_sim, or targets (softalign.functional.soft_labels)")
    t_img = check_square_pair(teacher_image_sim, "teacher_image_sim", batch, validate)
    t_txt = check_square_pair(teacher_text_sim, "teacher_text_sim", batch, validate)
    s_i, s_t = teacher_temperature if isinstance(teacher_temperature, (tuple, list)) else (teacher_temperature,) * 2
    first, second = combine_teacher_similarities(t_img, t_txt, mode)
    return soft_labels(first, s_i, dtype, validate), soft_labels(second, s_t, dtype, validate)


def cross_modal_soft_label_alignment(
    scores: torch.Tensor,
    teacher_image_sim: torch.Tensor | None,
    teacher_text_sim: torch.Tensor | None,
    temperature: Number | tuple[Number, Number] = 0.45,
    teacher_temperature: Number | tuple[Number, Number] = 1.0,
    mode: str = "each",
    *,
    targets: tuple[SoftLabels, SoftLabels] | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Cross-modal Soft-label Alignment (CSA) [CUSA, Eq. 5].

    ``L_CSA = 1/2 [ KL(softmax(T_i2t / tau_s) || softmax(S / tau_c))
                 + KL(softmax(T_t2i / tau_s) || softmax(S^T / tau_c)) ]``

    where ``S`` is the student's image-text score matrix and ``T_i2t, T_t2i`` come from
    :func:`combine_teacher_similarities` (``each``: teacher image-image and text-text similarities).
    ``temperature`` / ``teacher_temperature`` may be ``(image, text)`` pairs. ``targets``: the ``(i2t, t2i)`` soft
    labels computed once (:func:`soft_labels`; then the teacher matrices are not read).
    """
    scores = check_square_pair(scores, "scores", validate=validate)
    b = scores.shape[0]
    t_i, t_t = temperature if isinstance(temperature, (tuple, list)) else (temperature, temperature)
    if targets is None:
        targets = _pair_targets(
            teacher_image_sim, teacher_text_sim, teacher_temperature, b, scores.dtype, validate, mode
        )
    i2t = soft_label_kl(scores, temperature=t_i, target=targets[0], validate=validate)
    t2i = soft_label_kl(scores.t(), temperature=t_t, target=targets[1], validate=validate)
    return (i2t + t2i) / 2.0


def uni_modal_soft_label_alignment(
    student_image_sim: torch.Tensor,
    student_text_sim: torch.Tensor,
    teacher_image_sim: torch.Tensor | None,
    teacher_text_sim: torch.Tensor | None,
    temperature: Number | tuple[Number, Number] = 0.45,
    teacher_temperature: Number | tuple[Number, Number] = 1.0,
    *,
    targets: tuple[SoftLabels, SoftLabels] | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Uni-modal Soft-label Alignment (USA) [CUSA, Eq. 6].

    ``L_USA = 1/2 [ KL(softmax(T_ii / tau_s) || softmax(S_ii / tau_i))
                 + KL(softmax(T_tt / tau_s) || softmax(S_tt / tau_t)) ]``

    with the student's uni-modal similarities ``S_ii`` (image-image) and ``S_tt`` (text-text). ``targets``: the
    ``(image, text)`` soft labels computed once (:func:`soft_labels`).
    """
    student_image_sim = check_square_pair(student_image_sim, "student_image_sim", validate=validate)
    b = student_image_sim.shape[0]
    student_text_sim = check_square_pair(student_text_sim, "student_text_sim", b, validate)
    t_i, t_t = temperature if isinstance(temperature, (tuple, list)) else (temperature, temperature)
    if targets is None:
        targets = _pair_targets(
            teacher_image_sim, teacher_text_sim, teacher_temperature, b, student_image_sim.dtype, validate
        )
    image = soft_label_kl(student_image_sim, temperature=t_i, target=targets[0], validate=validate)
    text = soft_label_kl(student_text_sim, temperature=t_t, target=targets[1], validate=validate)
    return (image + text) / 2.0


# ----------------------------------------------------------------------------------------------
# contrastive base losses


def vsepp_hinge(
    scores: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    margin: float = 0.2,
    max_violation: bool = True,
    negatives: MinedNegatives | None = None,
    reduction: str = "sum",
    validate: bool = True,
) -> torch.Tensor:
    """VSE++ bidirectional hinge loss with id-aware positives [VSE++, Eq. 2-5].

    For pair ``p`` with score ``s_pp``:
    ``cost_i2t[p, k] = [margin - s_pp + S[p, k]]_+`` over captions ``k`` that are negatives of image ``p``;
    ``cost_t2i[k, p] = [margin - s_pp + S[k, p]]_+`` over images ``k`` that are negatives of caption ``p``.
    Negatives are pairs with a different image id (and, if ``negatives`` is given, selected by a miner).
    ``max_violation`` keeps only the hardest negative per anchor (VSE++ "MH"), otherwise all are summed
    ("SH"). The per-anchor costs of both directions are summed (``reduction='sum'``, as VSE++) or averaged.
    """
    scores = check_square_pair(scores, "scores", validate=validate)
    b = scores.shape[0]
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    pos = _pair_positive_mask(b, image_ids, scores.device)
    if negatives is None:
        excluded_i2t = excluded_t2i = pos
    else:
        excluded_i2t = pos | ~negatives.i2t.to(scores.device)
        excluded_t2i = pos | ~negatives.t2i.to(scores.device)
    diagonal = scores.diagonal()
    total = vsepp_hinge_rows(
        scores, scores.t(), diagonal, diagonal, excluded_i2t, excluded_t2i.t(), margin, max_violation
    )
    return total if reduction == "sum" else total / b


def vsepp_hinge_rows(
    s_i2t: torch.Tensor,
    s_t2i: torch.Tensor,
    positive_i2t: torch.Tensor,
    positive_t2i: torch.Tensor,
    excluded_i2t: torch.Tensor,
    excluded_t2i: torch.Tensor,
    margin: float,
    max_violation: bool,
) -> torch.Tensor:
    """The sum over ``b`` anchors of VSE++'s hinge costs, both directions [VSE++, Eq. 2-5]: the one code path of
    the hinge (:func:`vsepp_hinge` passes the whole matrix).

    ``s_i2t`` ``[b, B]``: image anchors x captions; ``s_t2i`` ``[b, B]``: caption anchors x images;
    ``positive_*`` ``[b]``: each anchor's positive score; ``excluded_*`` ``[b, B]`` (bool): columns that are not
    negatives of the anchor (its positives, and what a miner drops). ``max_violation``: ``[m + max_k S_pk - s_pp]_+``
    over the negatives ``k`` (equal to ``max_k [m - s_pp + S_pk]_+``, as rounding is monotone; 0 without
    negatives), else the sum of the hinges.
    """
    if max_violation:
        hard_i2t = s_i2t.masked_fill(excluded_i2t, float("-inf")).max(dim=1).values
        hard_t2i = s_t2i.masked_fill(excluded_t2i, float("-inf")).max(dim=1).values
        return (
            (margin + hard_i2t - positive_i2t).clamp(min=0) + (margin + hard_t2i - positive_t2i).clamp(min=0)
        ).sum()
    cost_i2t = (margin + s_i2t - positive_i2t.view(-1, 1)).clamp(min=0).masked_fill(excluded_i2t, 0.0)
    cost_t2i = (margin + s_t2i - positive_t2i.view(-1, 1)).clamp(min=0).masked_fill(excluded_t2i, 0.0)
    return cost_i2t.sum() + cost_t2i.sum()


def infonce_reduction(value: str) -> str:
    """``"ce"`` (cross-entropy averaged over anchors) or ``"cusa_mean"`` (CE / B); anything else is an error."""
    if value not in ("ce", "cusa_mean"):
        raise ValueError(
            f"InfoNCE reduction must be 'ce' (cross-entropy) or 'cusa_mean' (CUSA's CE / B), got {value!r}"
        )
    return value


def info_nce(
    scores: torch.Tensor,
    temperature: Number = 0.05,
    image_ids: torch.Tensor | None = None,
    reduction: str = "ce",
    validate: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE with id-aware (multi-positive) targets [CLIP; CUSA's contrastive term].

    ``L = 1/2 [ -1/B sum_i sum_j y_ij log softmax_j(S_ij / t) - 1/B sum_j sum_i y_ij log softmax_i(S_ij / t) ]``
    with ``y_ij = [id_i == id_j] / sum_k [id_i == id_k]`` (uniform over the pair's positives).

    ``reduction="ce"`` (default) is the standard cross-entropy above, averaged over the anchors.
    ``reduction="cusa_mean"`` is CUSA's ``contrastive_loss_mode: "mean"`` (its configs' setting): the inner sum over
    ``j`` becomes a mean, i.e. the loss is divided by ``B``. CUSA's CSA/USA weights (0.1 / 0.5) are tuned against
    that scale.
    """
    reduction = infonce_reduction(reduction)
    scores = check_square_pair(scores, "scores", validate=validate)
    b = scores.shape[0]
    temperature = _temperature(temperature, "temperature", validate)
    if image_ids is not None:
        _check_image_ids(b, image_ids)
    logits = scores / temperature
    loss = info_nce_rows(logits, logits.t(), None if image_ids is None else image_ids.to(scores.device)) / b
    return loss / b if reduction == "cusa_mean" else loss


def info_nce_rows(
    logits_i2t: torch.Tensor,
    logits_t2i: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    all_image_ids: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """The sum over ``b`` anchors of the symmetric (multi-positive) InfoNCE, halved [CLIP]: the one code path of
    the contrastive term (:func:`info_nce` passes the whole matrix).

    ``logits_i2t`` / ``logits_t2i``: ``[b, B]`` image / caption anchors x the batch, over the temperature. Anchor
    ``i``'s cross-entropy is ``logsumexp_j z_ij - mean_{j in P(i)} z_ij``, with ``P(i)`` the columns showing its image
    (``image_ids`` ``[b]`` against ``all_image_ids`` ``[B]``, default the same ids), or column ``offset + i`` without
    ids. Autograd keeps the logits (for ``logsumexp``) and at most a boolean mask.
    """
    b = logits_i2t.shape[0]
    if image_ids is None:
        cols = (torch.arange(b, device=logits_i2t.device) + offset).view(b, 1)
        positive = logits_i2t.gather(1, cols).sum() + logits_t2i.gather(1, cols).sum()
    else:
        pos = positive_mask(image_ids, all_image_ids)
        count = pos.sum(dim=1)
        positive = (torch.where(pos, logits_i2t, 0.0).sum(dim=1) / count).sum() + (
            torch.where(pos, logits_t2i, 0.0).sum(dim=1) / count
        ).sum()
    return (torch.logsumexp(logits_i2t, dim=1).sum() + torch.logsumexp(logits_t2i, dim=1).sum() - positive) / 2.0


# ----------------------------------------------------------------------------------------------
# consistency (TGDT)


def intra_modal_consistency(
    student_image_sim: torch.Tensor,
    student_text_sim: torch.Tensor,
    margin: float = 0.3,
    validate: bool = True,
) -> torch.Tensor:
    """Intra-modal consistency term of TGDT's CMC loss.

    ``L_intra = sum_j [ max_i |S_tt - S_ii|_ij - margin ]_+``: for every column ``j`` the largest gap between
    the text-text and the image-image similarity of the same pairs is pushed below ``margin``.
    """
    student_image_sim = check_square_pair(student_image_sim, "student_image_sim", validate=validate)
    student_text_sim = check_square_pair(student_text_sim, "student_text_sim", student_image_sim.shape[0], validate)
    return intra_modal_consistency_rows(student_image_sim.t(), student_text_sim.t(), margin)


def intra_modal_consistency_rows(image_sim_rows: torch.Tensor, text_sim_rows: torch.Tensor, margin: float = 0.3):
    """``sum_j [max_i |S_tt - S_ii|_ji - margin]_+`` over ``[b, B]`` rows of the (symmetric) uni-modal
    similarities: the one code path of TGDT's intra term (:func:`intra_modal_consistency` passes the transposed
    matrices, whose rows are its columns)."""
    return ((text_sim_rows - image_sim_rows).abs().max(dim=1).values - margin).clamp(min=0).sum()


def consistent_multimodal_contrastive(
    scores: torch.Tensor,
    student_image_sim: torch.Tensor,
    student_text_sim: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    margin: float = 0.2,
    intra_margin: float = 0.3,
    negatives: MinedNegatives | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Consistent Multimodal Contrastive loss [TGDT]: ``L_CMC = L_inter + L_intra``.

    ``L_inter`` is the VSE++ max-violation hinge (margin 0.2) on the image-text scores and ``L_intra`` is
    :func:`intra_modal_consistency` (margin 0.3) on the student's image-image and text-text similarities.
    """
    inter = vsepp_hinge(scores, image_ids, margin=margin, max_violation=True, negatives=negatives, validate=validate)
    intra = intra_modal_consistency(student_image_sim, student_text_sim, margin=intra_margin, validate=validate)
    return inter + intra
