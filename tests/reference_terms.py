"""Every SoftAlignLoss term written out from its paper over the whole ``[B, B]`` matrices, with torch's own
``kl_div`` / ``cross_entropy`` and a per-anchor loop for the hinge: an independent computation that shares no code
with softalign's row path (tests/test_anchor_rows.py, tests/test_distributed.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from softalign.losses.contrastive import InfoNCELoss, VSEHingeLoss


def _hinge(s: torch.Tensor, pos: torch.Tensor, margin: float, max_violation: bool) -> torch.Tensor:
    """VSE++ [Faghri et al., BMVC 2018]: per anchor ``p``, the hinges over its negatives, both directions."""
    total = s.new_zeros(())
    for p in range(s.shape[0]):
        for scores, negative in ((s[p], ~pos[p]), (s[:, p], ~pos[:, p])):
            cost = (margin + scores[negative] - s[p, p]).clamp(min=0)
            if cost.numel():
                total = total + (cost.max() if max_violation else cost.sum())
    return total


def _kl(student_logits: torch.Tensor, teacher: torch.Tensor, tau_s) -> torch.Tensor:
    """``KL(softmax(T / tau_s) || softmax(student_logits))`` averaged over rows [CUSA, Eq. 3-4]."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher / tau_s, dim=1), reduction="batchmean")


def reference_parts(loss, img, txt, teacher_image_sim, teacher_text_sim, image_ids=None, features=None):
    """``{"base", "csa", "usa", "cmc"}`` (unweighted, as ``return_parts=True`` gives them) of ``loss`` on the whole
    batch. ``features``: USA's ``(image, text)`` backbone features, else the embeddings."""
    b = img.shape[0]
    ids = torch.arange(b) if image_ids is None else image_ids
    pos = ids.view(-1, 1) == ids.view(1, -1)
    y_i, y_t = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    s = y_i @ y_t.T
    parts = {}
    base = loss.base
    if isinstance(base, VSEHingeLoss):
        total = _hinge(s, pos, base.margin, base.max_violation)
        parts["base"] = total if base.reduction == "sum" else total / b
    elif isinstance(base, InfoNCELoss):
        tau = base.temperature()
        targets = pos.float() / pos.float().sum(dim=1, keepdim=True)  # uniform over the positives
        ce = (F.cross_entropy(s / tau, targets) + F.cross_entropy(s.T / tau, targets)) / 2
        parts["base"] = ce / b if base.reduction == "cusa_mean" else ce
    scale = float(b) if loss.soft_label_reduction == "sum" else 1.0
    t_img, t_txt = teacher_image_sim.float(), teacher_text_sim.float()
    if loss.csa is not None:
        fused = {"each": (t_img, t_txt), "add": ((t_img + t_txt) / 2,) * 2}[loss.csa.mode]
        tau_i, tau_t = loss.csa.temperatures()
        s_i, s_t = loss.csa.teacher_temperatures()
        parts["csa"] = scale * (_kl(s / tau_i, fused[0], s_i) + _kl(s.T / tau_t, fused[1], s_t)) / 2
    if loss.usa is not None:
        usa = loss.usa
        f_i, f_t = features if features is not None else (img, txt)
        h_i, h_t = F.normalize(usa.image_head(f_i), dim=1), F.normalize(usa.text_head(f_t), dim=1)
        parts["usa"] = (
            scale
            * (
                _kl(h_i @ h_i.T / usa.image_temperature(), t_img, usa.teacher_temperature())
                + _kl(h_t @ h_t.T / usa.text_temperature(), t_txt, usa.text_teacher_temperature())
            )
            / 2
        )
    if loss.cmc is not None:
        # TGDT [Liu et al., IEEE TIP 2023]: the max over rows i of each column j of |S_tt - S_ii|
        gap = (y_t @ y_t.T - y_i @ y_i.T).abs()
        intra = (gap.max(dim=0).values - loss.cmc.intra_margin).clamp(min=0).sum()
        hinge_base = isinstance(base, VSEHingeLoss)
        parts["cmc"] = intra if hinge_base else _hinge(s, pos, loss.cmc.margin, True) + intra
    return parts
