"""sentence-transformers: :class:`~softalign.losses.SoftAlignLoss` as a sentence-transformers loss.

The training dataset has two input columns and a ``label`` column:

* the first column is the *image side* (images for a CLIP-style model, or queries / anchor texts for text-text
  retrieval), the second the *captions*;
* ``label`` holds each row's **caption id**: the row of its caption in the teacher cache (soft labels,
  positives). Rows whose captions belong to the same cache image are positives of each other.

::

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from softalign.eval import RetrievalEvaluator
    from softalign.integrations.sentence_transformers import SoftAlignSTLoss
    from softalign.losses import SoftAlignLoss
    from softalign.teachers import TeacherCache

    model = SentenceTransformer("all-MiniLM-L6-v2")
    loss = SoftAlignSTLoss(model, SoftAlignLoss(base="infonce", cache=TeacherCache.load("cache/train")))
    trainer = SentenceTransformerTrainer(model=model, train_dataset=train_ds, loss=loss,
                                         evaluator=RetrievalEvaluator(queries, captions, caption_to_image))
    trainer.train()

The adapter is an ``nn.Module`` holding the model and the soft-label loss, so the trainer's optimizer (built from
the loss module's parameters) also trains the loss's heads and temperatures. It returns the *weighted* terms
(``{"base", "csa", "usa", "cmc"}``, :meth:`SoftAlignLoss.weighted_parts`): the trainer sums the dict and logs each
entry, and nothing is counted twice. For text-text retrieval, the cache's image table holds the teacher
embeddings of the first column (e.g. ``softalign cache import-npy`` with the anchors' teacher embeddings as the
"image" features).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from softalign.losses import SoftAlignLoss

__all__ = ["SoftAlignSTLoss"]


class SoftAlignSTLoss(nn.Module):
    """``SoftAlignLoss`` with the sentence-transformers loss convention ``loss(sentence_features, labels)``.

    Args:
        model: the ``SentenceTransformer`` being trained (both columns are embedded by it).
        loss: a :class:`~softalign.losses.SoftAlignLoss`, usually with a ``cache``; default
            ``SoftAlignLoss(base="infonce")``.
    """

    def __init__(self, model: nn.Module, loss: nn.Module | None = None):
        super().__init__()
        from softalign.losses import SoftAlignLoss

        loss = loss if loss is not None else SoftAlignLoss(base="infonce")
        if not isinstance(loss, SoftAlignLoss):
            raise TypeError(f"loss must be a softalign SoftAlignLoss, got {type(loss).__name__}")
        self.model = model
        self.loss: SoftAlignLoss = loss

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]],
                labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        features = list(sentence_features)
        if len(features) != 2:
            raise ValueError(f"SoftAlignSTLoss takes two input columns (the image or query side, then the "
                             f"captions) and a 'label' column of caption ids; got {len(features)} input columns")
        if labels is None:
            raise ValueError("SoftAlignSTLoss needs the caption ids as the dataset's 'label' column")
        image_side, captions = (self.model(f)["sentence_embedding"] for f in features)
        parts = self.loss(image_side, captions, ids=labels, return_parts=True)
        return self.loss.weighted_parts(parts)

    @property
    def citation(self) -> str:
        return str(self.loss.citation)

    def get_config_dict(self) -> dict[str, Any]:
        return dict(self.loss.get_config_dict())
