"""Several teachers as one: similarities averaged with weights, as MobileCLIP's reinforced data combines its CLIP
teachers [Vasu et al., "MobileCLIP", CVPR 2024].

For unit teacher embeddings ``e_k`` and weights ``w_k >= 0`` with ``sum_k w_k = 1``, the concatenation
``[sqrt(w_1) e_1, ..., sqrt(w_K) e_K]`` has unit norm and

    ``<x(p), x(q)> = sum_k w_k <e_k(p), e_k(q)>``,

so :class:`TeacherEnsemble` returns those concatenations from :meth:`~TeacherEnsemble.embeddings`: every consumer
of a :class:`~softalign.teachers.TeacherCache` (the loss, across processes too, the calibration, the miners) sees
the weighted mean of the members' cosine similarities without knowing it has several teachers. The members must
describe the same captions and images (the same caption->image map).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from softalign.teacher_inputs import TeacherBatch, TeacherSimilarities

__all__ = ["TeacherEnsemble"]


def _weights(weights: Sequence[float] | None, n: int, what: str) -> list[float]:
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"TeacherEnsemble: {what} has {len(w)} entries for {n} teachers")
    bad = next((i for i, x in enumerate(w) if not x >= 0), None)
    if bad is not None or sum(w) <= 0:
        raise ValueError(f"TeacherEnsemble: {what} must be >= 0 with a positive sum, got {w}")
    return [x / sum(w) for x in w]


class TeacherEnsemble:
    """Teacher caches of the same data combined: ``image = sum_k w_k T_ii^(k)``, ``text = sum_k v_k T_tt^(k)``.

    Args:
        caches: two or more :class:`~softalign.teachers.TeacherCache` (or objects with its lookup methods) over the
            same captions and caption->image map.
        image_weights, text_weights: one weight per cache (default equal), normalised to sum to 1; a weight of 0
            leaves that cache's teacher out of the modality.
    """

    def __init__(
        self,
        caches: Sequence,
        image_weights: Sequence[float] | None = None,
        text_weights: Sequence[float] | None = None,
    ):
        caches = list(caches)
        if len(caches) < 2:
            raise ValueError(f"TeacherEnsemble needs two or more teacher caches, got {len(caches)}")
        first = torch.as_tensor(caches[0].caption_to_image).long().cpu()
        for k, c in enumerate(caches[1:], start=1):
            other = torch.as_tensor(c.caption_to_image).long().cpu()
            if other.shape != first.shape or not torch.equal(other, first):
                raise ValueError(
                    f"TeacherEnsemble: cache {k} ({getattr(c, 'path', c)}) describes other captions or "
                    f"images than cache 0 ({getattr(caches[0], 'path', caches[0])}): their "
                    "caption->image maps differ"
                )
        self.caches = caches
        self.image_weights = _weights(image_weights, len(caches), "image_weights")
        self.text_weights = _weights(text_weights, len(caches), "text_weights")
        self.caption_to_image = caches[0].caption_to_image
        self.path = " + ".join(str(getattr(c, "path", type(c).__name__)) for c in caches)

    @property
    def num_captions(self) -> int:
        return int(self.caches[0].num_captions)

    @property
    def num_images(self) -> int:
        return int(self.caches[0].num_images)

    def __len__(self) -> int:
        return self.num_captions

    def __repr__(self) -> str:
        return (
            f"TeacherEnsemble({len(self.caches)} teachers, image_weights={self.image_weights}, "
            f"text_weights={self.text_weights})"
        )

    def image_ids(self, caption_ids) -> torch.Tensor:
        return self.caches[0].image_ids(caption_ids)

    def embeddings(self, caption_ids, device=None, gather: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image [B, sum D_i], text [B, sum D_t])``: the members' unit embeddings scaled by ``sqrt(w_k)`` and
        concatenated (unit norm; dot products are the weighted mean cosine similarities)."""
        batch = self.lookup(caption_ids, device=device, gather=gather)
        return batch.image, batch.text

    def lookup(self, caption_ids, device=None, gather: bool = False) -> TeacherBatch:
        """``TeacherBatch(image_ids, image, text)`` of a batch (:meth:`TeacherCache.lookup`): the ids are checked
        once, by the first cache, and every member reads its rows at them."""
        if device is None:
            device = caption_ids.device if isinstance(caption_ids, torch.Tensor) else torch.device("cpu")
        first = self.caches[0]
        ids = first._ids(caption_ids, gather)
        image_ids = first.caption_to_image[ids]
        parts = [c._rows(ids, image_ids, device) for c in self.caches]
        img = torch.cat([w**0.5 * p[0] for w, p in zip(self.image_weights, parts) if w > 0], dim=1)
        txt = torch.cat([w**0.5 * p[1] for w, p in zip(self.text_weights, parts) if w > 0], dim=1)
        return TeacherBatch(image_ids.to(device, non_blocking=True), img, txt)

    def similarities(self, caption_ids, device=None, gather: bool = False) -> TeacherSimilarities:
        img, txt = self.embeddings(caption_ids, device=device, gather=gather)
        return TeacherSimilarities(image=img @ img.T, text=txt @ txt.T)

    def image_embeddings(self, image_ids, device=None) -> torch.Tensor:
        return torch.cat(
            [
                w**0.5 * c.image_embeddings(image_ids, device=device)
                for w, c in zip(self.image_weights, self.caches)
                if w > 0
            ],
            dim=1,
        )
