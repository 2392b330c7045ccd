"""Id-aware and teacher-filtered hard-negative miners over a cross-modal score matrix.

A miner looks at the ``[B, B]`` image x caption scores of a batch of pairs and returns
:class:`~softalign.functional.MinedNegatives`: boolean masks of the negatives each anchor may use
(``i2t[i, k]``: caption ``k`` for image ``i``; ``t2i[k, j]``: image ``k`` for caption ``j``). Positives
(pairs sharing an image id) are never returned as negatives. Pass a miner to
:class:`~softalign.losses.VSEHingeLoss` / :class:`~softalign.losses.SoftAlignLoss`.

* :class:`MaxViolationMiner` / :class:`TopKMiner` -- the hardest negative(s) per anchor [VSE++].
* :class:`SemiHardMiner` -- negatives scored below the positive but within the margin
  (FaceNet's semi-hard rule, Schroff et al., CVPR 2015) written for similarities.
* :class:`TeacherFilteredMiner` -- drops negatives whose teacher similarity to the anchor's pair marks them as
  likely false negatives (another caption that describes the same scene), then applies an inner miner.
* :class:`PMLMiner` -- adapts any ``pytorch_metric_learning`` tuple miner (e.g. ``TripletMarginMiner``,
  ``BatchHardMiner``) to the cross-modal setting via its ``ref_emb`` interface, so nothing it offers is rewritten.
"""

from __future__ import annotations

import torch

from softalign.functional import MinedNegatives, check_square_pair, positive_mask

__all__ = [
    "NegativeMiner",
    "AllNegativesMiner",
    "MaxViolationMiner",
    "TopKMiner",
    "SemiHardMiner",
    "TeacherFilteredMiner",
    "PMLMiner",
]


class NegativeMiner:
    """Base class. Subclasses implement :meth:`mine`; calling the miner validates inputs first."""

    def __call__(
        self,
        scores: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        *,
        teacher_image_sim: torch.Tensor | None = None,
        teacher_text_sim: torch.Tensor | None = None,
        image_emb: torch.Tensor | None = None,
        text_emb: torch.Tensor | None = None,
    ) -> MinedNegatives:
        scores = check_square_pair(scores, "scores", validate=False).detach()  # checked by the loss that mines
        b = scores.shape[0]
        if image_ids is None:
            image_ids = torch.arange(b, device=scores.device)
        elif image_ids.shape != (b,):
            raise ValueError(f"image_ids must have shape [{b}], got {tuple(image_ids.shape)}")
        negatives = ~positive_mask(image_ids.to(scores.device))
        return self.mine(
            scores,
            negatives,
            image_ids=image_ids,
            teacher_image_sim=teacher_image_sim,
            teacher_text_sim=teacher_text_sim,
            image_emb=image_emb,
            text_emb=text_emb,
        )

    def mine(self, scores: torch.Tensor, negatives: torch.Tensor, **context) -> MinedNegatives:
        raise NotImplementedError

    def get_config_dict(self) -> dict:
        return {"name": type(self).__name__}


def mine_negatives(
    miner: NegativeMiner | None, scores, image_ids, teacher=None, image_emb=None, text_emb=None
) -> MinedNegatives | None:
    """What a loss module passes its miner: the scores and ids, ``teacher`` (``TeacherSimilarities(image, text)``,
    or None) as the miner's ``teacher_image_sim`` / ``teacher_text_sim``, and the embeddings. None without a miner."""
    if miner is None:
        return None
    return miner(
        scores,
        image_ids,
        teacher_image_sim=None if teacher is None else teacher[0],
        teacher_text_sim=None if teacher is None else teacher[1],
        image_emb=image_emb,
        text_emb=text_emb,
    )


class AllNegativesMiner(NegativeMiner):
    """Every non-positive is a negative (VSE++ "sum of hinges")."""

    def mine(self, scores, negatives, **context):
        return MinedNegatives(negatives, negatives)


def _top_k_mask(values: torch.Tensor, allowed: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Mask of the ``k`` largest ``values`` along ``dim`` among ``allowed`` entries."""
    k = min(k, values.shape[dim])
    masked = values.masked_fill(~allowed, float("-inf"))
    idx = masked.topk(k, dim=dim).indices
    mask = torch.zeros_like(allowed).scatter_(dim, idx, True)
    return mask & allowed


class TopKMiner(NegativeMiner):
    """The ``k`` highest-scoring negatives per anchor, in both directions [VSE++ with k > 1]."""

    def __init__(self, k: int = 1):
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)

    def mine(self, scores, negatives, **context):
        return MinedNegatives(
            _top_k_mask(scores, negatives, self.k, dim=1), _top_k_mask(scores, negatives, self.k, dim=0)
        )

    def get_config_dict(self):
        return {"name": type(self).__name__, "k": self.k}


class MaxViolationMiner(TopKMiner):
    """The hardest negative per anchor: VSE++'s max of hinges ("MH")."""

    def __init__(self):
        super().__init__(k=1)


class SemiHardMiner(NegativeMiner):
    """Negatives with ``s_pos - margin < s_neg < s_pos`` (harder than the margin, easier than the positive)."""

    def __init__(self, margin: float = 0.2):
        self.margin = float(margin)

    def mine(self, scores, negatives, **context):
        pos = scores.diagonal()
        i2t = negatives & (scores < pos.view(-1, 1)) & (scores > pos.view(-1, 1) - self.margin)
        t2i = negatives & (scores < pos.view(1, -1)) & (scores > pos.view(1, -1) - self.margin)
        return MinedNegatives(i2t, t2i)

    def get_config_dict(self):
        return {"name": type(self).__name__, "margin": self.margin}


class TeacherFilteredMiner(NegativeMiner):
    """Drop likely false negatives, then mine with ``inner``.

    For anchor pair ``p`` and candidate ``k`` the teacher's similarity of the two pairs is taken from
    ``teacher_image_sim[p, k]`` (``source='image'``), ``teacher_text_sim[p, k]`` (``'text'``), their maximum
    (``'max'``, default) or mean (``'mean'``). Candidates at or above ``threshold`` are not used as negatives.
    """

    SOURCES = ("image", "text", "max", "mean")

    def __init__(self, threshold: float = 0.9, inner: NegativeMiner | None = None, source: str = "max"):
        if source not in self.SOURCES:
            raise ValueError(f"source must be one of {self.SOURCES}, got {source!r}")
        self.threshold = float(threshold)
        self.inner = inner if inner is not None else MaxViolationMiner()
        self.source = source

    def mine(self, scores, negatives, *, teacher_image_sim=None, teacher_text_sim=None, **context):
        b = scores.shape[0]
        need_image = self.source in ("image", "max", "mean")
        need_text = self.source in ("text", "max", "mean")
        if (need_image and teacher_image_sim is None) or (need_text and teacher_text_sim is None):
            raise ValueError(
                f"TeacherFilteredMiner(source={self.source!r}) needs teacher similarities: pass a cache to the loss "
                "or teacher_image_sim/teacher_text_sim"
            )
        sims = []
        if need_image:
            sims.append(check_square_pair(teacher_image_sim, "teacher_image_sim", b, False).to(scores.device))
        if need_text:
            sims.append(check_square_pair(teacher_text_sim, "teacher_text_sim", b, False).to(scores.device))
        if self.source == "mean":
            teacher = (sims[0] + sims[1]) / 2
        elif self.source == "max":
            teacher = torch.maximum(sims[0], sims[1])
        else:
            teacher = sims[0]
        kept = negatives & (teacher < self.threshold)
        inner = self.inner.mine(
            scores, kept, teacher_image_sim=teacher_image_sim, teacher_text_sim=teacher_text_sim, **context
        )
        return MinedNegatives(inner.i2t & kept, inner.t2i & kept)

    def get_config_dict(self):
        return {
            "name": type(self).__name__,
            "threshold": self.threshold,
            "source": self.source,
            "inner": self.inner.get_config_dict(),
        }


class PMLMiner(NegativeMiner):
    """Use a ``pytorch_metric_learning`` miner across modalities.

    The PML miner is called as ``miner(image_emb, image_ids, text_emb, image_ids)`` (images as queries,
    captions as references) for i2t and with the roles swapped for t2i. Its triplets ``(a, p, n)`` or pairs
    ``(a1, p, a2, n)`` become the negative masks. Requires embeddings (not available for score-only models).
    """

    def __init__(self, miner):
        if not hasattr(miner, "forward") and not callable(miner):
            raise TypeError(f"PMLMiner needs a pytorch_metric_learning miner, got {type(miner).__name__}")
        self.miner = miner

    def _mask(self, query, ref, ids, b, device):
        tuples = self.miner(query, ids, ref, ids)
        if len(tuples) == 3:
            anchor, _, neg = tuples
        elif len(tuples) == 4:
            _, _, anchor, neg = tuples
        else:  # pragma: no cover - PML always returns pairs or triplets
            raise ValueError("unexpected miner output")
        mask = torch.zeros(b, b, dtype=torch.bool, device=device)
        mask[anchor.to(device), neg.to(device)] = True
        return mask

    def mine(self, scores, negatives, *, image_ids=None, image_emb=None, text_emb=None, **context):
        if image_emb is None or text_emb is None:
            raise ValueError("PMLMiner needs image_emb and text_emb (it cannot mine from a score matrix alone)")
        b = scores.shape[0]
        ids = image_ids.to(image_emb.device)
        i2t = self._mask(image_emb.detach(), text_emb.detach(), ids, b, scores.device)
        t2i = self._mask(text_emb.detach(), image_emb.detach(), ids, b, scores.device).t()
        return MinedNegatives(i2t & negatives, t2i & negatives)

    def get_config_dict(self):
        return {"name": type(self).__name__, "miner": type(self.miner).__name__}
