"""SCAN trainer shim (kuanghuei/SCAN, ``SCAN`` model object).

SCAN's model object has the VSE++ call structure (``train_emb(images, captions, lengths, ids=None, *args)`` ->
``forward_emb`` -> ``forward_loss(img_emb, cap_emb, cap_len)`` -> ``criterion(im, s, s_l)``), but its
``B x B`` score matrix comes from stacked cross attention computed *inside* the criterion
(``xattn_score_t2i`` / ``xattn_score_i2t`` of the criterion's module, chosen by ``opt.cross_attn``).
The cross-attention scorer is the expensive part of a SCAN step, so the shim replaces ``model.criterion`` with
a :class:`SoftAlignCriterion` that calls the scorer **once** and feeds the same scores to the hinge and to the
soft-label terms (``SoftAlignLoss(scores=S, ...)``: CSA on ``S``; USA and CMC's intra term on pooled region /
word features)::

    model = softalign.integrations.scan.patch(SCAN(opt), SoftAlignLoss(embed_dim=opt.embed_size, cache=cache))

Hinge: always an id-aware hinge on the shared scores with SCAN's ``--margin`` and ``--max_violation``
(``criterion.margin`` / ``criterion.max_violation``): the loss's hinge base (``"vsepp"``/``"vsepp_sum"``) takes
them when they differ, with a warning naming both (``match_criterion=False``: keep the loss's and warn); with
``base="none"`` an id-aware :class:`~softalign.losses.VSEHingeLoss` built from them. Ids, optimizer,
checkpoints and evaluation behave as in :mod:`softalign.integrations.vsepp`.

References: Lee et al., "Stacked Cross Attention for Image-Text Matching", ECCV 2018; CUSA (AAAI 2024).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from softalign.integrations import generic
from softalign.integrations._common import (
    SoftAlignHook,
    capture_ids,
    drop_record,
    extend_list_state,
    log_values,
    match_criterion_hinge,
    new_record,
    restore_list_state,
)
from softalign.losses import VSEHingeLoss

__all__ = ["patch", "unpatch", "is_patched", "SoftAlignCriterion", "module_scorer", "mean_pool"]

KIND = "scan"


def module_scorer(criterion: Any) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    """SCAN's own scorer: ``xattn_score_t2i`` or ``xattn_score_i2t`` (per ``criterion.opt.cross_attn``) from the
    module that defines the criterion's class, called as ``fn(images, captions, cap_lens, opt)``."""
    opt = getattr(criterion, "opt", None)
    direction = getattr(opt, "cross_attn", None)
    if direction not in ("t2i", "i2t"):
        raise ValueError(
            f"cannot find SCAN's scorer: criterion.opt.cross_attn must be 't2i' or 'i2t', got "
            f"{direction!r}; pass scorer=callable(images, captions, cap_lens) -> [B, B] scores"
        )
    module = sys.modules.get(type(criterion).__module__)
    name = f"xattn_score_{direction}"
    if not callable(getattr(module, name, None)):
        raise ValueError(
            f"module {type(criterion).__module__!r} of the criterion has no {name}(); pass "
            "scorer=callable(images, captions, cap_lens) -> [B, B] scores"
        )

    def scorer(images, captions, cap_lens):
        return getattr(module, name)(images, captions, cap_lens, opt)  # looked up per call (monkeypatch-safe)

    return scorer


def mean_pool(
    images: torch.Tensor, captions: torch.Tensor, cap_lens: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled embeddings for USA/CMC: mean of the region features ``[B, R, D] -> [B, D]`` and of the first
    ``cap_lens[j]`` word features of each caption ``[B, W, D] -> [B, D]``."""
    if images.dim() != 3 or captions.dim() != 3:
        raise ValueError(
            f"SCAN features must be [B, regions, D] and [B, words, D], got {tuple(images.shape)} "
            f"and {tuple(captions.shape)}"
        )
    lens = torch.as_tensor(
        list(cap_lens) if not isinstance(cap_lens, torch.Tensor) else cap_lens, device=captions.device
    )
    if lens.shape != (captions.shape[0],) or bool((lens < 1).any()) or bool((lens > captions.shape[1]).any()):
        raise ValueError(
            f"cap_lens must hold {captions.shape[0]} lengths in [1, {captions.shape[1]}], got {lens.tolist()}"
        )
    mask = (torch.arange(captions.shape[1], device=captions.device).view(1, -1) < lens.view(-1, 1)).to(captions.dtype)
    text = (captions * mask.unsqueeze(-1)).sum(dim=1) / lens.to(captions.dtype).view(-1, 1)
    return images.mean(dim=1), text


class SoftAlignCriterion(nn.Module):
    """Stands in for SCAN's ``ContrastiveLoss``: ``criterion(im, s, s_l)``.

    During a training step (ids captured by the patched ``train_emb``): ``S = scorer(im, s, s_l)`` once, then
    ``hinge(S) + alpha L_CSA(S) + beta L_USA(pool) + gamma L_CMC`` (the SoftAlignLoss total when it has a base).
    Without ids (evaluation): the original criterion, unchanged.
    """

    scorer: Callable
    pool: Callable
    original: Any

    def __init__(
        self,
        original: Any,
        hook: SoftAlignHook,
        record: Any,
        scorer: Callable,
        pool: Callable,
        logger_owner: Any = None,
    ):
        super().__init__()
        self.hook, self.record, self.scorer, self.pool = hook, record, scorer, pool
        self.__dict__["original"] = original  # not a submodule: the SCAN model keeps owning it
        self.__dict__["logger_owner"] = logger_owner
        self.hinge = None
        if not hook.base_enabled:
            self.hinge = VSEHingeLoss(
                margin=float(getattr(original, "margin", 0.2)),
                max_violation=bool(getattr(original, "max_violation", True)),
            )

    def forward(self, im, s, s_l):
        ids = self.record.ids
        if ids is None:
            return self.original(im, s, s_l)
        scores = self.scorer(im, s, s_l)
        image_emb, text_emb = self.pool(im, s, s_l)
        parts = self.hook(image_emb, text_emb, ids, scores=scores)
        weighted = self.hook.weighted(parts)
        total = parts["loss"]
        if self.hinge is not None:
            weighted["base"] = self.hinge(scores=scores, image_ids=self.hook.image_ids(ids, scores.device))
            total = total + weighted["base"]
        log_values(
            self.logger_owner,
            "logger",
            {k: v for k, v in weighted.items() if k != "base"},
            int(scores.shape[0]),
            self.hook,
        )
        return total


def patch(
    model: Any,
    loss: nn.Module,
    *,
    captions_per_image: int = 5,
    cache: Any = None,
    image_ids: Callable | None = None,
    scorer: Callable | None = None,
    pool: Callable = mean_pool,
    accelerator: Any = None,
    optimizer: Any = None,
    match_criterion: bool = True,
) -> Any:
    """Patch a SCAN model object in place and return it.

    Args:
        loss: a :class:`~softalign.losses.SoftAlignLoss`; ``embed_dim`` is the dimension of the pooled
            features (``opt.embed_size``).
        scorer: ``scorer(images, captions, cap_lens) -> [n_image, n_caption]`` scores; default SCAN's own
            ``xattn_score_*`` (see :func:`module_scorer`).
        pool: ``pool(images, captions, cap_lens) -> (image [B, D], text [B, D])`` for USA/CMC; default
            :func:`mean_pool`.
        match_criterion: when the loss's hinge base differs from SCAN's criterion in margin / max_violation,
            use the criterion's (``loss.base`` is changed, restored by :func:`unpatch`) and warn; ``False``: keep
            the loss's settings and warn.
        captions_per_image, cache, image_ids, accelerator, optimizer: as :func:`softalign.integrations.vsepp.patch`.
    """
    for name in ("train_emb", "forward_loss", "state_dict", "load_state_dict", "criterion"):
        if getattr(model, name, None) is None:
            raise TypeError(f"expected a SCAN model with .{name}; {type(model).__name__} has none")
    if not callable(pool):
        raise TypeError(f"pool must be callable(images, captions, cap_lens), got {type(pool).__name__}")
    optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            "the SCAN model has no .optimizer; pass optimizer=... so the loss's heads and temperatures are trained"
        )
    criterion = model.criterion
    scorer = scorer if scorer is not None else module_scorer(criterion)
    if not callable(scorer):
        raise TypeError(f"scorer must be callable(images, captions, cap_lens), got {type(scorer).__name__}")
    hook = SoftAlignHook(
        loss, cache=cache, captions_per_image=captions_per_image, image_ids=image_ids, accelerator=accelerator
    )
    record = new_record(model, hook, KIND)
    try:
        capture_ids(record, "train_emb")
        if hook.base_enabled:
            undo = match_criterion_hinge(loss, criterion, "SCAN", adopt=match_criterion)
            if undo is not None:
                record.undo.append(undo)
        new = SoftAlignCriterion(criterion, hook, record, scorer, pool, logger_owner=model)
        if accelerator is not None:
            new.to(accelerator.device)
        record.replace("criterion", new)
        record.replace("state_dict", extend_list_state(model.state_dict, hook))
        record.replace("load_state_dict", restore_list_state(model.load_state_dict, hook))
        params = getattr(model, "params", None)
        if isinstance(params, list):
            known = {id(p) for p in params}
            record.replace("params", params + [p for p in hook.parameters() if id(p) not in known])
        hook.register(optimizer)
        record.optimizer = optimizer
    except Exception:
        record.restore()
        drop_record(model)
        raise
    return model


unpatch, is_patched = generic.shim_api(KIND)
