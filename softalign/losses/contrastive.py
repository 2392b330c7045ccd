"""Base cross-modal losses: VSE++ hinge and symmetric InfoNCE, with positives from ids."""

from __future__ import annotations

import torch
from torch import nn

from softalign import functional as SF
from softalign.losses import citations
from softalign.losses._inputs import ChecksValuesOnce, default_similarity, resolve_scores
from softalign.losses.temperature import ClampedTemperature
from softalign.mining import NegativeMiner, mine_negatives


class VSEHingeLoss(ChecksValuesOnce, nn.Module):
    """VSE++ bidirectional hinge loss [Faghri et al., BMVC 2018]; see :func:`softalign.functional.vsepp_hinge`.

    Args:
        margin: hinge margin (VSE++: 0.2).
        max_violation: keep only the hardest negative per anchor ("MH"); ``False`` sums all ("SH").
        miner: optional :class:`~softalign.mining.NegativeMiner` restricting the negatives first.
        reduction: ``"sum"`` over anchors (VSE++) or ``"mean"``.
        similarity: maps ``(image_emb, text_emb)`` to scores; default cosine (torch only; any PML distance works).
    """

    citation = citations.VSEPP

    def __init__(
        self,
        margin: float = 0.2,
        max_violation: bool = True,
        miner: NegativeMiner | None = None,
        reduction: str = "sum",
        similarity=None,
    ):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.margin, self.max_violation, self.miner, self.reduction = (
            float(margin),
            bool(max_violation),
            miner,
            reduction,
        )
        self.similarity = similarity if similarity is not None else default_similarity()

    def forward(
        self,
        image_emb=None,
        text_emb=None,
        *,
        scores=None,
        image_ids=None,
        teacher=None,
    ) -> torch.Tensor:
        """``teacher``: ``TeacherSimilarities(image, text)`` (``[B, B]`` each), for a miner that reads them."""
        validate = self._take_value_check()
        scores = resolve_scores(image_emb, text_emb, scores, self.similarity, validate)
        negatives = mine_negatives(self.miner, scores, image_ids, teacher, image_emb, text_emb)
        return self._checked(
            SF.vsepp_hinge(
                scores,
                image_ids,
                margin=self.margin,
                max_violation=self.max_violation,
                negatives=negatives,
                reduction=self.reduction,
                validate=False,
            )
        )

    def get_config_dict(self) -> dict:
        return {
            "margin": self.margin,
            "max_violation": self.max_violation,
            "reduction": self.reduction,
            "miner": None if self.miner is None else self.miner.get_config_dict(),
        }


class InfoNCELoss(ChecksValuesOnce, nn.Module):
    """Symmetric InfoNCE with multi-positive targets from ids; see :func:`softalign.functional.info_nce`.

    Defaults follow CUSA's contrastive term: temperature 0.05, learnable within ``[0.01, 0.1]``.
    ``reduction="cusa_mean"`` is CUSA's ``contrastive_loss_mode: "mean"`` (cross-entropy / B), the scale its
    soft-label weights were tuned against; ``"ce"`` (default) is the standard cross-entropy.
    """

    citation = citations.join(citations.INFONCE, citations.CUSA)

    def __init__(
        self,
        temperature: float = 0.05,
        temperature_range: tuple[float, float] = (0.01, 0.1),
        learn_temperature: bool = True,
        similarity=None,
        reduction: str = "ce",
    ):
        super().__init__()
        reduction = SF.infonce_reduction(reduction)
        self.reduction = reduction
        self.temperature = ClampedTemperature(
            temperature, temperature_range if learn_temperature else None, learn_temperature
        )
        self.similarity = similarity if similarity is not None else default_similarity()

    def forward(self, image_emb=None, text_emb=None, *, scores=None, image_ids=None, temperature=None) -> torch.Tensor:
        """``temperature``: this call's temperature in place of the module's own, e.g. ``1 / logit_scale`` of a
        CLIP model (a tensor keeps its gradient)."""
        scores = resolve_scores(image_emb, text_emb, scores, self.similarity, self._take_value_check())
        tau = self.temperature() if temperature is None else temperature
        return self._checked(SF.info_nce(scores, tau, image_ids, reduction=self.reduction, validate=False))

    def get_config_dict(self) -> dict:
        t = self.temperature
        return {
            "temperature": float(t.value),
            "temperature_range": (t.low, t.high),
            "learn_temperature": t.learnable,
            "reduction": self.reduction,
        }
