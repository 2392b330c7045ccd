"""Local rows x global columns: under multi-process training each process evaluates the terms of its own anchors.

With the embeddings gathered across processes (:func:`softalign.distributed.all_gather_with_grad`), the loss of the
global batch ``B`` is a sum over anchors: image anchors are rows of ``S = img @ txt^T``, caption anchors rows of
``S^T``, and every soft-label, hinge, InfoNCE and intra-modal term is a sum of row terms. So process ``r`` needs only
the rows of its ``b_r`` anchors against the ``B`` columns of the whole batch, as open_clip's ``ClipLoss(local_loss=
True)`` does: each ``[B, B]`` matrix becomes ``[b_r, B]`` (at a global batch of 32K on 8 processes, 1/8 of the
memory). With ``partial_r`` its anchors' share of the global value (normalisers use the global ``B``),

* the returned value is ``sum_r partial_r``, the exact global loss (one scalar all-reduce per term, no gradient);
* the gradient is that of ``world * partial_r``: the gather's backward sums over processes and data-parallel
  averaging divides by ``world``, which gives the exact gradient of the global loss, as before;
* the loss's own parameters (USA heads, temperatures), which data parallelism does not average, get their gradients
  all-reduced (mean) by hooks that :class:`~softalign.losses.SoftAlignLoss` installs.

The 2-process test (``tests/test_distributed.py``) checks values and gradients against one process holding the whole
batch. Used for cosine similarity with the built-in bases and no miner; anything else keeps the global matrices.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from softalign import functional as SF


def _rows_positive_mask(
    row_ids: torch.Tensor | None, col_ids: torch.Tensor | None, offset: int, b: int, n: int, device
) -> torch.Tensor:
    if row_ids is None:  # diagonal positives: local anchor i is global column offset + i
        return torch.arange(n, device=device).view(1, n) == (torch.arange(b, device=device) + offset).view(b, 1)
    return SF.positive_mask(row_ids, col_ids)


def _hinge_rows(s_i2t, s_t2i, diag_i2t, diag_t2i, pos, margin: float, max_violation: bool) -> torch.Tensor:
    """Sum over the local anchors of VSE++'s per-anchor hinge costs (both directions)."""
    if max_violation:
        hard_i2t = s_i2t.masked_fill(pos, float("-inf")).max(dim=1).values
        hard_t2i = s_t2i.masked_fill(pos, float("-inf")).max(dim=1).values
        return ((margin + hard_i2t - diag_i2t).clamp(min=0) + (margin + hard_t2i - diag_t2i).clamp(min=0)).sum()
    cost_i2t = (margin + s_i2t - diag_i2t.view(-1, 1)).clamp(min=0).masked_fill(pos, 0.0)
    cost_t2i = (margin + s_t2i - diag_t2i.view(-1, 1)).clamp(min=0).masked_fill(pos, 0.0)
    return cost_i2t.sum() + cost_t2i.sum()


def _info_nce_rows(s_i2t, s_t2i, pos, temperature) -> torch.Tensor:
    """Sum over the local anchors of the (multi-positive) cross-entropy, both directions, halved."""
    targets = pos.to(s_i2t.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    i2t = -(F.log_softmax(s_i2t / temperature, dim=1) * targets).sum()
    t2i = -(F.log_softmax(s_t2i / temperature, dim=1) * targets).sum()
    return (i2t + t2i) / 2.0


def _kl_rows(student, target: SF.SoftLabels, temperature) -> torch.Tensor:
    """Sum over the rows of ``KL(P || softmax(S / tau))`` for soft labels ``P`` (no gradient to the teacher)."""
    log_q = F.log_softmax(student / temperature, dim=1)
    return (target.probs * (target.log_probs - log_q)).sum()


def local_row_parts(
    loss: Any,
    img_l,
    txt_l,
    img_g,
    txt_g,
    feats,
    image_ids_l,
    image_ids_g,
    teacher,
    offset: int,
    batch: int,
    base_temperature=None,
) -> dict[str, torch.Tensor]:
    """This process's share ``partial_r`` of every switched-on term of ``loss`` (a :class:`SoftAlignLoss`), each
    normalised as the global term is (``batch`` = the global batch size).

    ``img_l`` / ``txt_l``: this process's ``[b, D]`` embeddings; ``img_g`` / ``txt_g``: the gathered ``[B, D]``;
    ``feats``: ``(image_l, text_l, image_g, text_g)`` backbone features for USA's heads, or None; ``teacher``:
    ``(image_l, text_l, image_g, text_g)`` L2-normalised teacher embeddings, or None; ``offset``: this process's
    first row in the global batch; ``base_temperature``: InfoNCE's temperature for this call (else its own).
    """
    from softalign.losses.contrastive import InfoNCELoss, VSEHingeLoss

    b, n = img_l.shape[0], img_g.shape[0]
    y_img_l, y_txt_l = F.normalize(img_l, dim=1, eps=1e-12), F.normalize(txt_l, dim=1, eps=1e-12)
    y_img_g, y_txt_g = F.normalize(img_g, dim=1, eps=1e-12), F.normalize(txt_g, dim=1, eps=1e-12)
    s_i2t = y_img_l @ y_txt_g.t()  # local images x all captions
    s_t2i = y_txt_l @ y_img_g.t()  # local captions x all images
    cols = torch.arange(b, device=img_l.device) + offset
    diag_i2t = s_i2t.gather(1, cols.view(-1, 1)).squeeze(1)
    diag_t2i = s_t2i.gather(1, cols.view(-1, 1)).squeeze(1)
    pos = _rows_positive_mask(image_ids_l, image_ids_g, offset, b, n, img_l.device)
    parts: dict[str, torch.Tensor] = {}
    base = loss.base
    if isinstance(base, VSEHingeLoss):
        total = _hinge_rows(s_i2t, s_t2i, diag_i2t, diag_t2i, pos, base.margin, base.max_violation)
        parts["base"] = total if base.reduction == "sum" else total / n
    elif isinstance(base, InfoNCELoss):
        tau = base.temperature() if base_temperature is None else base_temperature
        total = _info_nce_rows(s_i2t, s_t2i, pos, tau) / n
        parts["base"] = total / n if base.reduction == "cusa_mean" else total
    soft_scale = float(n) if loss.soft_label_reduction == "sum" else 1.0
    if teacher is not None:
        e_img_l, e_txt_l, e_img_g, e_txt_g = teacher
        t_img_rows, t_txt_rows = e_img_l @ e_img_g.t(), e_txt_l @ e_txt_g.t()
    csa_targets = usa_targets = None
    if teacher is not None:  # once per teacher matrix, shared by CSA and USA as on the global path
        csa_targets, usa_targets = loss.soft_label_targets(t_img_rows, t_txt_rows)
    if loss.csa is not None and csa_targets is not None:
        tau_i, tau_t = loss.csa.temperatures()
        p_i2t, p_t2i = csa_targets
        csa = (_kl_rows(s_i2t, p_i2t, tau_i) + _kl_rows(s_t2i, p_t2i, tau_t)) / 2.0
        parts["csa"] = soft_scale * csa / n
    if loss.usa is not None and usa_targets is not None:
        usa = loss.usa
        if feats is not None:
            f_img_l, f_txt_l, f_img_g, f_txt_g = feats
        else:
            f_img_l, f_txt_l, f_img_g, f_txt_g = img_l, txt_l, img_g, txt_g
        dtype = usa._head_dtype(f_img_l.dtype)

        def head(module, x):
            return F.normalize(module(x.to(dtype)).to(x.dtype), dim=1, eps=1e-8)

        u_ii = head(usa.image_head, f_img_l) @ head(usa.image_head, f_img_g).t()
        u_tt = head(usa.text_head, f_txt_l) @ head(usa.text_head, f_txt_g).t()
        value = (
            _kl_rows(u_ii, usa_targets[0], usa.image_temperature())
            + _kl_rows(u_tt, usa_targets[1], usa.text_temperature())
        ) / 2.0
        parts["usa"] = soft_scale * value / n
    if loss.cmc is not None:
        # TGDT's intra term sums over columns j the max over rows i of |S_tt - S_ii|; both matrices are symmetric,
        # so column j's max is row j's: this process sums the rows of its anchors
        gap = (y_txt_l @ y_txt_g.t() - y_img_l @ y_img_g.t()).abs()
        intra = (gap.max(dim=1).values - loss.cmc.intra_margin).clamp(min=0).sum()
        if isinstance(base, VSEHingeLoss):
            parts["cmc"] = intra  # on a hinge base CMC adds only the intra term
        else:
            parts["cmc"] = _hinge_rows(s_i2t, s_t2i, diag_i2t, diag_t2i, pos, loss.cmc.margin, True) + intra
    return parts


def supports_local_rows(loss: Any) -> bool:
    """Whether ``loss`` (a SoftAlignLoss) can use the local-row path: cosine similarity, a built-in base, no miner."""
    from softalign.losses.contrastive import InfoNCELoss, VSEHingeLoss

    if not getattr(loss, "local_rows", True) or not loss._cosine or loss.miner is not None:
        return False
    if loss.base is not None and not isinstance(loss.base, (VSEHingeLoss, InfoNCELoss)):
        return False
    if isinstance(loss.base, VSEHingeLoss) and loss.base.miner is not None:
        return False
    return not (loss.cmc is not None and loss.cmc.miner is not None)
