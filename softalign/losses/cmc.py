"""Consistent Multimodal Contrastive (CMC) loss from TGDT [Liu et al., IEEE TIP 2023]."""

from __future__ import annotations

import torch
from torch import nn

from softalign import functional as SF
from softalign.losses import citations
from softalign.losses._inputs import ChecksValuesOnce, check_embeddings, default_similarity, resolve_scores
from softalign.mining import NegativeMiner, mine_negatives


class CMCLoss(ChecksValuesOnce, nn.Module):
    """``L_CMC = L_inter + L_intra`` with ``L_inter`` the VSE++ max-violation hinge (margin 0.2) and
    ``L_intra = sum_j [max_i |S_tt - S_ii|_ij - 0.3]_+`` over the student's image-image / text-text cosine
    similarities. Embeddings are required for the intra term; ``scores`` may replace their product for the
    inter term (cross-attention models).
    """

    citation = citations.TGDT

    def __init__(
        self, margin: float = 0.2, intra_margin: float = 0.3, miner: NegativeMiner | None = None, similarity=None
    ):
        super().__init__()
        self.margin, self.intra_margin, self.miner = float(margin), float(intra_margin), miner
        self.similarity = similarity if similarity is not None else default_similarity()

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        *,
        scores=None,
        image_ids=None,
        teacher=None,
        image_sim=None,
        text_sim=None,
    ) -> torch.Tensor:
        """``image_sim`` / ``text_sim``: the student's ``[B, B]`` uni-modal cosine similarities, if the caller
        already has them (otherwise computed from the embeddings); ``teacher``: ``TeacherSimilarities(image, text)``
        for a miner that reads them."""
        validate = self._take_value_check()
        image_emb, text_emb = check_embeddings(image_emb, text_emb, same_dim=False, validate=validate)
        scores = resolve_scores(image_emb, text_emb, scores, self.similarity, validate)
        image_sim = SF.cosine_similarity_matrix(image_emb, validate=False) if image_sim is None else image_sim
        text_sim = SF.cosine_similarity_matrix(text_emb, validate=False) if text_sim is None else text_sim
        negatives = mine_negatives(self.miner, scores, image_ids, teacher, image_emb, text_emb)
        return self._checked(
            SF.consistent_multimodal_contrastive(
                scores,
                image_sim,
                text_sim,
                image_ids,
                margin=self.margin,
                intra_margin=self.intra_margin,
                negatives=negatives,
                validate=False,
            )
        )

    def get_config_dict(self) -> dict:
        return {
            "margin": self.margin,
            "intra_margin": self.intra_margin,
            "miner": None if self.miner is None else self.miner.get_config_dict(),
        }
