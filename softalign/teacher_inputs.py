"""What a teacher gives the loss for one batch, as named types (torch only; no package import).

:class:`~softalign.losses.SoftAlignLoss` takes ``teacher=`` as one of

* a cache (:class:`~softalign.teachers.TeacherCache`, :class:`~softalign.teachers.TeacherEnsemble`, or any object
  whose ``lookup(caption_ids, device)`` returns a :class:`TeacherBatch`), read at the ``ids`` the loss gets;
* :class:`TeacherEmbeddings`: the teacher's ``[B, D_t]`` image and caption embeddings of the batch (gathered
  across processes like the student's);
* :class:`TeacherSimilarities`: its ``[B, B]`` image-image and text-text similarities (one process: a matrix of
  the whole batch cannot be gathered).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["TeacherBatch", "TeacherEmbeddings", "TeacherSimilarities"]


class TeacherSimilarities(NamedTuple):
    """Teacher cosine similarities of a batch: ``image`` [B, B] (image-image) and ``text`` [B, B] (text-text)."""

    image: torch.Tensor
    text: torch.Tensor


class TeacherEmbeddings(NamedTuple):
    """Teacher embeddings of a batch: ``image`` [B, D_i] (the image of each pair) and ``text`` [B, D_t]."""

    image: torch.Tensor
    text: torch.Tensor


class TeacherBatch(NamedTuple):
    """What a cache gives per step (:meth:`~softalign.teachers.TeacherCache.lookup`): ``image_ids`` [B] and the
    teacher's L2-normalised ``image`` [B, D_i] / ``text`` [B, D_t] embeddings of the batch, fp32."""

    image_ids: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor
