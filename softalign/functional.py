"""Pure functions over similarity matrices: the formulas behind every softalign loss.

Conventions
-----------
* A batch holds ``B`` (image, caption) pairs. A cross-modal score matrix ``S`` is ``[B, B]`` with
  images as rows and captions as columns, so ``S[p, p]`` is the score of pair ``p``.
* ``image_ids`` (``[B]`` int) says which image each pair shows. Pairs that share an image id are
  positives of each other and are never used as negatives ("positives come from ids").
* Every function upcasts its inputs to float32 (float64 stays float64) and rejects non-finite values.

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

import contextlib
import contextvars
from typing import NamedTuple

import torch
import torch.nn.functional as F

Number = float | torch.Tensor

CSA_MODES = ("each", "add", "dot")

__all__ = [
    "CSA_MODES",
    "MinedNegatives",
    "as_float",
    "inputs_validated",
    "check_square_pair",
    "cosine_similarity_matrix",
    "positive_mask",
    "soft_label_kl",
    "cross_modal_soft_label_alignment",
    "uni_modal_soft_label_alignment",
    "combine_teacher_similarities",
    "vsepp_hinge",
    "info_nce",
    "intra_modal_consistency",
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


_VALIDATE = contextvars.ContextVar("softalign_validate_inputs", default=True)


@contextlib.contextmanager
def inputs_validated():
    """Within this block the functions skip their finiteness checks (the caller has checked its inputs once).

    :class:`~softalign.losses.SoftAlignLoss` validates its inputs on entry and then evaluates every term
    inside this context, so the checks are not repeated once per term on the hot path.
    """
    token = _VALIDATE.set(False)
    try:
        yield
    finally:
        _VALIDATE.reset(token)


def as_float(x: torch.Tensor, name: str) -> torch.Tensor:
    """Upcast ``x`` to at least float32 and check it is finite; ``name`` appears in the error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != torch.float64:
        x = x.float()
    # One reduction on the common path: the sum of squares is finite iff every element is finite and no
    # norm or dot product of these values overflows (|x| ~ 1e19 in fp32 squares past 3.4e38, and the loss would
    # silently turn NaN); the error path then tells the two apart.
    if _VALIDATE.get() and not torch.isfinite(x.detach().square().sum()):
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(f"{name} contains non-finite values (first at index {tuple(bad)})")
        big = float(x.detach().abs().max())
        raise ValueError(f"{name} holds values too large for {str(x.dtype).replace('torch.', '')} (max |x| = "
                         f"{big:.3g}): their squares and dot products overflow to inf and the loss would be NaN. "
                         "Normalise or rescale the embeddings (e.g. F.normalize(x, dim=-1))")
    return x


def check_square_pair(x: torch.Tensor, name: str, batch: int | None = None) -> torch.Tensor:
    """Validate a ``[B, B]`` matrix (optionally with a known ``B``) and upcast it."""
    x = as_float(x, name)
    if x.dim() != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be a square [B, B] matrix, got shape {tuple(x.shape)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but the batch has {batch} pairs; expected [{batch}, {batch}]")
    return x


def _temperature(t: Number, name: str) -> Number:
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(t.shape)}")
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


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """``S[i, j] = <a_i, b_j> / (|a_i| |b_j|)``, computed in float32 (``b`` defaults to ``a``)."""
    a = as_float(a, "a")
    other = a if b is None else as_float(b, "b")
    if a.dim() != 2 or other.dim() != 2 or a.shape[1] != other.shape[1]:
        raise ValueError(f"embeddings must be [N, D] with equal D, got {tuple(a.shape)} and {tuple(other.shape)}")
    a = F.normalize(a, dim=1, eps=eps)
    other = a if b is None else F.normalize(other, dim=1, eps=eps)
    return a @ other.t()


class _NormalizedGram(torch.autograd.Function):
    """``Y = F.normalize(X, dim=1, eps)`` for ``X = [image; text]`` and the blocks of ``Y Y^T`` that are asked for.

    Returns ``(S_it, S_ii, S_tt)`` (``S_ii`` / ``S_tt`` only with ``uni=True``). The backward sums the gradients
    of all blocks into one ``[2B, 2B] @ [2B, D]`` product and applies the normalisation's analytic gradient
    ``dX = (dY - [|x| >= eps] * Y * <dY, Y>) / max(|x|, eps)``. First order only (no double backward).
    """

    @staticmethod
    def forward(ctx, image_emb, text_emb, uni, eps):
        norm_img = torch.linalg.vector_norm(image_emb, dim=1, keepdim=True)
        norm_txt = torch.linalg.vector_norm(text_emb, dim=1, keepdim=True)
        y_img = image_emb / norm_img.clamp_min(eps)
        y_txt = text_emb / norm_txt.clamp_min(eps)
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        scores = y_img @ y_txt.t()
        if not uni:
            ctx.save_for_backward(y_img, y_txt, norm_img, norm_txt, scores)
            return scores, None, None
        s_ii, s_tt = y_img @ y_img.t(), y_txt @ y_txt.t()
        ctx.save_for_backward(y_img, y_txt, norm_img, norm_txt, scores, s_ii, s_tt)
        return scores, s_ii, s_tt

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_scores, g_img, g_txt):
        y_img, y_txt, norm_img, norm_txt, scores, *uni = ctx.saved_tensors
        eps = ctx.eps
        # under a caller's autocast the products (and their gradients) may be low precision
        g_scores, g_img, g_txt = (None if g is None else g.to(y_img.dtype) for g in (g_scores, g_img, g_txt))
        grads = []
        # d/dY_img = G_s Y_txt + (G_ii + G_ii^T) Y_img; d/dY_txt = G_s^T Y_img + (G_tt + G_tt^T) Y_txt.
        # <dY_r, Y_r> = sum_k G_rk (Y Y^T)_rk is taken from the [B, B] blocks, not from the [B, D] products.
        weighted = None if g_scores is None else g_scores * scores
        for k, (y, other, norm, g_uni) in enumerate(((y_img, y_txt, norm_img, g_img), (y_txt, y_img, norm_txt, g_txt))):
            g_y = dot = None
            if g_scores is not None:
                g_cross = g_scores if k == 0 else g_scores.t()
                g_y = g_cross @ other
                dot = weighted.sum(dim=1 - k).unsqueeze(1)
            if g_uni is not None:
                sym = g_uni + g_uni.t()
                uni_dot = torch.linalg.vecdot(sym, uni[k], dim=1).unsqueeze(1)
                g_y = sym @ y if g_y is None else g_y.addmm_(sym, y)
                dot = uni_dot if dot is None else dot.add_(uni_dot)
            if g_y is None:
                grads.append(None)
                continue
            # normalisation: clamp_min passes the norm's gradient where norm >= eps (as autograd's clamp does)
            dot.masked_fill_(norm < eps, 0.0)
            grads.append(g_y.addcmul_(y, dot, value=-1.0).div_(norm.clamp_min(eps)))
        return grads[0], grads[1], None, None


class _NormalizedSelfGram(torch.autograd.Function):
    """``Y Y^T`` for ``Y = F.normalize(X, dim=1, eps)``: :func:`cosine_similarity_matrix` of one ``[N, D]`` input
    with a fused backward (one ``(G + G^T) @ Y`` product, analytic normalisation gradient; first order only)."""

    @staticmethod
    def forward(ctx, x, eps):
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        y = x / norm.clamp_min(eps)
        ctx.save_for_backward(y, norm)
        ctx.eps = eps
        return y @ y.t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        y, norm = ctx.saved_tensors
        grad = grad.to(y.dtype)  # under a caller's autocast the product (and its gradient) may be low precision
        g_y = (grad + grad.t()) @ y
        dot = torch.linalg.vecdot(g_y, y, dim=1).unsqueeze(1).masked_fill_(norm < ctx.eps, 0.0)
        return g_y.addcmul_(y, dot, value=-1.0).div_(norm.clamp_min(ctx.eps)), None


def _self_cosine_similarity(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``cosine_similarity_matrix(x)`` of a checked ``[N, D]`` float tensor, as one fused autograd node."""
    return _NormalizedSelfGram.apply(x, eps)


def _cosine_similarities(image_emb: torch.Tensor, text_emb: torch.Tensor, uni: bool, eps: float = 1e-12):
    """Cosine scores ``S_it`` and, with ``uni``, the uni-modal ``S_ii`` / ``S_tt`` of checked ``[B, D]`` embeddings
    (normalised as ``F.normalize(., dim=1, eps=eps)``), in one fused autograd node."""
    return _NormalizedGram.apply(image_emb, text_emb, uni, eps)


def positive_mask(row_ids: torch.Tensor, col_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``M[i, j] = row_ids[i] == col_ids[j]`` (bool): pairs showing the same image are positives."""
    if col_ids is None:
        col_ids = row_ids
    if row_ids.dim() != 1 or col_ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shapes {tuple(row_ids.shape)} and {tuple(col_ids.shape)}")
    return row_ids.view(-1, 1) == col_ids.view(1, -1)


def _pair_positive_mask(batch: int, image_ids: torch.Tensor | None, device) -> torch.Tensor:
    if image_ids is None:
        return torch.eye(batch, dtype=torch.bool, device=device)
    if image_ids.shape != (batch,):
        raise ValueError(f"image_ids must have shape [{batch}] (one id per pair), got {tuple(image_ids.shape)}")
    return positive_mask(image_ids.to(device))


# ----------------------------------------------------------------------------------------------
# soft-label alignment (CUSA)


class _SoftLabels(NamedTuple):
    """A soft-label target ``P = softmax(teacher / teacher_temperature)`` (detached) and ``sum(xlogy(P, P))``."""

    probs: torch.Tensor
    neg_entropy: torch.Tensor


_SOFT_LABEL_CACHE: contextvars.ContextVar = contextvars.ContextVar("softalign_soft_label_cache", default=None)


@contextlib.contextmanager
def soft_labels_cached():
    """Within this block the soft-label targets of a teacher matrix are computed once and reused.

    CSA (mode ``each``) and USA both turn the same teacher matrices into ``softmax(T / tau_s)``;
    :class:`~softalign.losses.SoftAlignLoss` evaluates its terms inside this context so that happens once per
    forward. Entries are keyed on the teacher tensor's identity and version and on the teacher temperature.
    """
    token = _SOFT_LABEL_CACHE.set({})
    try:
        yield
    finally:
        _SOFT_LABEL_CACHE.reset(token)


def _temperature_key(t: Number):
    if not isinstance(t, torch.Tensor):
        return ("value", float(t))
    if not t.requires_grad:
        # _temperature has just read this value too; equal frozen temperatures (CSA's and USA's) share an entry
        return ("value", float(t.item()), t.dtype)
    return ("tensor", id(t), t._version)


def _soft_labels(teacher: torch.Tensor, teacher_temperature: Number, dtype: torch.dtype) -> _SoftLabels:
    cache = _SOFT_LABEL_CACHE.get()
    key = None
    if cache is not None:
        key = (id(teacher), teacher._version, _temperature_key(teacher_temperature), dtype)
        hit = cache.get(key)
        if hit is not None and hit[0] is teacher and (key[2][0] == "value" or hit[1] is teacher_temperature):
            return hit[2]
    t = teacher.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    ts = teacher_temperature.detach() if isinstance(teacher_temperature, torch.Tensor) else teacher_temperature
    logits = t / ts
    probs = F.softmax(logits, dim=1)
    # sum(xlogy(P, P)) with log P from log_softmax (finite for finite logits, so P_ij = 0 adds exactly 0)
    labels = _SoftLabels(probs, (probs * F.log_softmax(logits, dim=1)).sum())
    if cache is not None:
        # the tensors themselves are held so that their ids cannot be reused within the block
        cache[key] = (teacher, teacher_temperature, labels)
    return labels


class _SoftLabelKL(torch.autograd.Function):
    """``sum(P * (log P - log_softmax(s / t))) / B`` with an analytic backward.

    ``grad_s = g * (softmax(s / t) - P) / (t * B)`` and, for a tensor ``t``,
    ``grad_t = -g * sum((softmax(s / t) - P) * s) / (B * t^2)``. ``P`` carries no gradient. Double backward is
    not supported (the backward is not itself differentiable).
    """

    @staticmethod
    def forward(ctx, student, temperature, probs, neg_entropy):
        log_q = F.log_softmax(student / temperature, dim=1)
        loss = (neg_entropy - (probs * log_q).sum()) / student.shape[0]
        ctx.save_for_backward(student, log_q, probs, temperature if isinstance(temperature, torch.Tensor) else None)
        ctx.temperature = None if isinstance(temperature, torch.Tensor) else temperature
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        student, log_q, probs, t_tensor = ctx.saved_tensors
        t = t_tensor if t_tensor is not None else ctx.temperature
        diff = log_q.exp().sub_(probs)  # Q - P (log_q stays intact for a retained graph)
        scale = grad / student.shape[0]
        grad_s = grad_t = None
        if ctx.needs_input_grad[1] and t_tensor is not None:
            grad_t = ((diff * student).sum() * (-scale / (t * t))).to(t_tensor.dtype).reshape(t_tensor.shape)
        if ctx.needs_input_grad[0]:
            grad_s = diff.mul_(scale / t)
        return grad_s, grad_t, None, None


def soft_label_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: Number,
    teacher_temperature: Number = 1.0,
) -> torch.Tensor:
    """Row-wise soft-label KL divergence, averaged over rows ("batchmean") [CUSA, Eq. 3-4].

    ``KL(P || Q) = 1/B sum_i sum_j P_ij (log P_ij - log Q_ij)`` with
    ``P = softmax(teacher / teacher_temperature)`` (the soft label, no gradient) and
    ``Q = softmax(student / temperature)``; terms with ``P_ij = 0`` contribute 0 (``xlogy``).

    Computed by a fused autograd function with the analytic gradients
    ``d/dS = (Q - P) / (temperature * B)`` and ``d/dtemperature = -sum((Q - P) * S) / (B * temperature^2)``
    (first order only: double backward through this function is not supported).
    """
    student = as_float(student, "student similarities")
    teacher = as_float(teacher, "teacher similarities")
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"student and teacher similarities must be 2-D and of equal shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    temperature = _temperature(temperature, "temperature")
    teacher_temperature = _temperature(teacher_temperature, "teacher_temperature")
    if isinstance(teacher_temperature, torch.Tensor) and teacher_temperature.requires_grad \
            and torch.is_grad_enabled():
        # a learnable teacher temperature receives its gradient through the targets: plain autograd
        target = F.softmax(teacher.detach().to(student.dtype) / teacher_temperature, dim=1)
        return F.kl_div(F.log_softmax(student / temperature, dim=1), target, reduction="batchmean")
    labels = _soft_labels(teacher, teacher_temperature, student.dtype)
    return _SoftLabelKL.apply(student, temperature, labels.probs, labels.neg_entropy)


def combine_teacher_similarities(image_sim: torch.Tensor, text_sim: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
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


def cross_modal_soft_label_alignment(
    scores: torch.Tensor,
    teacher_image_sim: torch.Tensor,
    teacher_text_sim: torch.Tensor,
    temperature: Number | tuple[Number, Number] = 0.45,
    teacher_temperature: Number | tuple[Number, Number] = 1.0,
    mode: str = "each",
) -> torch.Tensor:
    """Cross-modal Soft-label Alignment (CSA) [CUSA, Eq. 5].

    ``L_CSA = 1/2 [ KL(softmax(T_i2t / tau_s) || softmax(S / tau_c))
                 + KL(softmax(T_t2i / tau_s) || softmax(S^T / tau_c)) ]``

    where ``S`` is the student's image-text score matrix and ``T_i2t, T_t2i`` come from
    :func:`combine_teacher_similarities` (``each``: teacher image-image and text-text similarities).
    ``temperature`` / ``teacher_temperature`` may be ``(image, text)`` pairs.
    """
    scores = check_square_pair(scores, "scores")
    b = scores.shape[0]
    teacher_image_sim = check_square_pair(teacher_image_sim, "teacher_image_sim", b)
    teacher_text_sim = check_square_pair(teacher_text_sim, "teacher_text_sim", b)
    t_i, t_t = temperature if isinstance(temperature, (tuple, list)) else (temperature, temperature)
    s_i, s_t = teacher_temperature if isinstance(teacher_temperature, (tuple, list)) else (teacher_temperature,) * 2
    target_i2t, target_t2i = combine_teacher_similarities(teacher_image_sim, teacher_text_sim, mode)
    i2t = soft_label_kl(scores, target_i2t, t_i, s_i)
    t2i = soft_label_kl(scores.t(), target_t2i, t_t, s_t)
    return (i2t + t2i) / 2.0


def uni_modal_soft_label_alignment(
    student_image_sim: torch.Tensor,
    student_text_sim: torch.Tensor,
    teacher_image_sim: torch.Tensor,
    teacher_text_sim: torch.Tensor,
    temperature: Number | tuple[Number, Number] = 0.45,
    teacher_temperature: Number | tuple[Number, Number] = 1.0,
) -> torch.Tensor:
    """Uni-modal Soft-label Alignment (USA) [CUSA, Eq. 6].

    ``L_USA = 1/2 [ KL(softmax(T_ii / tau_s) || softmax(S_ii / tau_i))
                 + KL(softmax(T_tt / tau_s) || softmax(S_tt / tau_t)) ]``

    with the student's uni-modal similarities ``S_ii`` (image-image) and ``S_tt`` (text-text).
    """
    student_image_sim = check_square_pair(student_image_sim, "student_image_sim")
    b = student_image_sim.shape[0]
    student_text_sim = check_square_pair(student_text_sim, "student_text_sim", b)
    teacher_image_sim = check_square_pair(teacher_image_sim, "teacher_image_sim", b)
    teacher_text_sim = check_square_pair(teacher_text_sim, "teacher_text_sim", b)
    t_i, t_t = temperature if isinstance(temperature, (tuple, list)) else (temperature, temperature)
    s_i, s_t = teacher_temperature if isinstance(teacher_temperature, (tuple, list)) else (teacher_temperature,) * 2
    image = soft_label_kl(student_image_sim, teacher_image_sim, t_i, s_i)
    text = soft_label_kl(student_text_sim, teacher_text_sim, t_t, s_t)
    return (image + text) / 2.0


# ----------------------------------------------------------------------------------------------
# contrastive base losses


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return x.sum()
    if reduction == "mean":
        return x.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def vsepp_hinge(
    scores: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    margin: float = 0.2,
    max_violation: bool = True,
    negatives: MinedNegatives | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """VSE++ bidirectional hinge loss with id-aware positives [VSE++, Eq. 2-5].

    For pair ``p`` with score ``s_pp``:
    ``cost_i2t[p, k] = [margin - s_pp + S[p, k]]_+`` over captions ``k`` that are negatives of image ``p``;
    ``cost_t2i[k, p] = [margin - s_pp + S[k, p]]_+`` over images ``k`` that are negatives of caption ``p``.
    Negatives are pairs with a different image id (and, if ``negatives`` is given, selected by a miner).
    ``max_violation`` keeps only the hardest negative per anchor (VSE++ "MH"), otherwise all are summed
    ("SH"). The per-anchor costs of both directions are summed (``reduction='sum'``, as VSE++) or averaged.
    """
    scores = check_square_pair(scores, "scores")
    b = scores.shape[0]
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    pos = _pair_positive_mask(b, image_ids, scores.device)
    return _hinge(scores, pos, margin, max_violation, negatives, reduction)


def _hinge(scores, pos, margin, max_violation, negatives, reduction):
    """:func:`vsepp_hinge` on checked inputs, with the ``[B, B]`` positive mask ``pos`` given."""
    b = scores.shape[0]
    diagonal = scores.diagonal()
    if negatives is None:
        excluded_i2t = excluded_t2i = pos
    else:
        excluded_i2t = pos | ~negatives.i2t.to(scores.device)
        excluded_t2i = pos | ~negatives.t2i.to(scores.device)
    if max_violation:
        # max_k [m - s_pp + S_pk]_+ over the negatives k equals [m + max_k S_pk - s_pp]_+ (rounding is monotone,
        # so this is exact), and 0 when there is none (-inf): one masked copy of the scores serves both directions.
        masked_i2t = scores.masked_fill(excluded_i2t, float("-inf"))
        masked_t2i = masked_i2t if excluded_t2i is excluded_i2t else scores.masked_fill(excluded_t2i, float("-inf"))
        per_anchor = ((margin + masked_i2t.max(dim=1).values) - diagonal).clamp(min=0) \
            + ((margin + masked_t2i.max(dim=0).values) - diagonal).clamp(min=0)
    else:
        cost_i2t = (margin + scores - diagonal.view(b, 1)).clamp(min=0).masked_fill(excluded_i2t, 0.0)
        cost_t2i = (margin + scores - diagonal.view(1, b)).clamp(min=0).masked_fill(excluded_t2i, 0.0)
        per_anchor = cost_i2t.sum(dim=1) + cost_t2i.sum(dim=0)
    return _reduce(per_anchor, reduction)


def info_nce(
    scores: torch.Tensor,
    temperature: Number = 0.05,
    image_ids: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Symmetric InfoNCE with id-aware (multi-positive) targets [CLIP; CUSA's contrastive term].

    ``L = 1/2 [ -1/B sum_i sum_j y_ij log softmax_j(S_ij / t) - 1/B sum_j sum_i y_ij log softmax_i(S_ij / t) ]``
    with ``y_ij = [id_i == id_j] / sum_k [id_i == id_k]`` (uniform over the pair's positives).

    ``reduction="sum"`` is the standard cross-entropy above. ``reduction="mean"`` is CUSA's
    ``contrastive_loss_mode: "mean"`` (its configs' setting): the inner sum over ``j`` becomes a mean, i.e. the
    loss is divided by ``B``. CUSA's CSA/USA weights (0.1 / 0.5) are tuned against that scale.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' (cross-entropy) or 'mean' (CUSA's mean mode), got {reduction!r}")
    scores = check_square_pair(scores, "scores")
    b = scores.shape[0]
    temperature = _temperature(temperature, "temperature")
    pos = _pair_positive_mask(b, image_ids, scores.device).to(scores.dtype)
    targets = pos / pos.sum(dim=1, keepdim=True)
    logits = scores / temperature
    i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    t2i = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
    loss = (i2t + t2i) / 2.0
    return loss / b if reduction == "mean" else loss


# ----------------------------------------------------------------------------------------------
# consistency (TGDT)


def intra_modal_consistency(
    student_image_sim: torch.Tensor,
    student_text_sim: torch.Tensor,
    margin: float = 0.3,
) -> torch.Tensor:
    """Intra-modal consistency term of TGDT's CMC loss.

    ``L_intra = sum_j [ max_i |S_tt - S_ii|_ij - margin ]_+``: for every column ``j`` the largest gap between
    the text-text and the image-image similarity of the same pairs is pushed below ``margin``.
    """
    student_image_sim = check_square_pair(student_image_sim, "student_image_sim")
    student_text_sim = check_square_pair(student_text_sim, "student_text_sim", student_image_sim.shape[0])
    gap = (student_text_sim - student_image_sim).abs()
    return (gap.max(dim=0).values - margin).clamp(min=0).sum()


def consistent_multimodal_contrastive(
    scores: torch.Tensor,
    student_image_sim: torch.Tensor,
    student_text_sim: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    margin: float = 0.2,
    intra_margin: float = 0.3,
    negatives: MinedNegatives | None = None,
) -> torch.Tensor:
    """Consistent Multimodal Contrastive loss [TGDT]: ``L_CMC = L_inter + L_intra``.

    ``L_inter`` is the VSE++ max-violation hinge (margin 0.2) on the image-text scores and ``L_intra`` is
    :func:`intra_modal_consistency` (margin 0.3) on the student's image-image and text-text similarities.
    """
    inter = vsepp_hinge(scores, image_ids, margin=margin, max_violation=True, negatives=negatives)
    intra = intra_modal_consistency(student_image_sim, student_text_sim, margin=intra_margin)
    return inter + intra
