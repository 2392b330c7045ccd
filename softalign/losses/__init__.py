"""nn.Module wrappers over :mod:`softalign.functional`.

Each loss takes student embeddings ``(image_emb, text_emb)`` of a batch of pairs, or a precomputed ``[B, B]``
image x caption ``scores`` matrix (cross-attention scorers such as SCAN/TERAN), and returns a scalar.
Learnable temperatures and heads are parameters of the loss: add ``loss.parameters()`` to the optimizer.
"""

from __future__ import annotations

from softalign.losses.cmc import CMCLoss
from softalign.losses.combined import SoftAlignLoss
from softalign.losses.contrastive import InfoNCELoss, VSEHingeLoss
from softalign.losses.csa import CSALoss
from softalign.losses.temperature import ClampedTemperature
from softalign.losses.usa import ProjectionHead, UniModalHead, USALoss
from softalign.teacher_inputs import TeacherEmbeddings, TeacherSimilarities

__all__ = [
    "SoftAlignLoss",
    "VSEHingeLoss",
    "InfoNCELoss",
    "CSALoss",
    "USALoss",
    "CMCLoss",
    "ClampedTemperature",
    "UniModalHead",
    "ProjectionHead",
    "TeacherEmbeddings",
    "TeacherSimilarities",
]
