"""One code path for every term: a process's own anchors (rows) against the whole batch (columns).

The loss of a batch of ``B`` pairs is a sum over anchors: image anchors are rows of ``S = img @ txt^T``, caption
anchors rows of ``S^T``, and every soft-label, hinge, InfoNCE and intra-modal term is a sum of row terms
(:mod:`softalign.functional`'s ``*_rows`` functions). So a process needs only the rows of its ``b`` anchors against
the ``B`` columns of the batch, as open_clip's ``ClipLoss(local_loss=True)`` does: each ``[B, B]`` matrix becomes
``[b, B]``. One process is the case ``b = B``, offset 0, the same code.

Memory. A temperature divides the ``[b, D]`` anchors before the product (``(x / tau) @ y^T``), so autograd keeps
the ``[b, B]`` logits only where ``logsumexp`` needs them; a soft-label term keeps its logits and ``P`` (not
``log P`` nor ``log Q``); CSA in mode ``each`` and USA share ``P``; a hinge keeps a boolean mask and the indices of
its maxima. The blocks per direction that outlive the forward: the base's logits (InfoNCE) or a mask (hinge), CSA's
logits, ``P``, USA's logits, CMC's gap.

Under multi-process training (:class:`~softalign.losses.SoftAlignLoss` with ``gather=True``), with ``partial_r``
a process's share of a term (normalisers use the global ``B``):

* the returned value is ``sum_r partial_r``, the exact global loss (one all-reduce of the detached terms);
* the gradient is that of ``world * partial_r``: the gather's backward sums over processes and data-parallel
  averaging divides by ``world``, which gives the exact gradient of the global loss;
* the loss's own parameters (USA heads, temperatures), which data parallelism does not average, get their gradients
  all-reduced (mean) by hooks that :class:`~softalign.losses.SoftAlignLoss` installs.

The 2-process tests (``tests/test_distributed.py``) check values and gradients against one process holding the
whole batch and against :mod:`softalign.functional`'s square-matrix formulas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from softalign import functional as SF

#: up to this many elements (4 MiB in fp32) a [b, B] product is kept once and divided by each term's temperature;
#: above it each term recomputes its block from the [b, D] rows divided by the temperature (memory over compute)
SHARED_PRODUCT_LIMIT = 1 << 20


@dataclass
class AnchorRows:
    """The student side of a batch: this process's ``b`` anchors and the ``B`` pairs of the (gathered) batch.

    ``image`` / ``text``: ``[b, D]`` checked fp32 embeddings and ``all_image`` / ``all_text`` ``[B, D]`` (the same
    tensors on one process); ``offset``: the first anchor's column; ``scores``: a precomputed ``[B, B]`` matrix
    (one process; SCAN/TERAN) used for the cross-modal scores instead of the embeddings; ``similarity``: a custom
    similarity (not cosine), or None; ``gather``: ``all_gather_with_grad`` over the processes (None on one).
    """

    image: torch.Tensor | None
    text: torch.Tensor | None
    all_image: torch.Tensor | None
    all_text: torch.Tensor | None
    offset: int = 0
    scores: torch.Tensor | None = None
    similarity: Any = None
    gather: Any = None

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, ...]`` rows of this process -> ``[B, ...]`` of the batch (gathered with gradients; the same tensor
        on one process)."""
        return x if self.gather is None else self.gather(x)

    def __post_init__(self) -> None:
        local = self.image if self.image is not None else self.scores
        whole = self.all_image if self.all_image is not None else self.scores
        assert local is not None and whole is not None, "AnchorRows needs embeddings or scores"
        self.size, self.batch = int(local.shape[0]), int(whole.shape[0])
        self._unit: tuple[torch.Tensor, ...] | None = None
        self._products: dict[str, torch.Tensor] = {}
        #: small blocks are computed once and scaled per term (fewer products); large ones are recomputed per term
        #: from the rows divided by the temperature, so that no unscaled block is held for the temperature's gradient
        self.share_products = (
            self.scores is not None or self.similarity is not None or self.size * self.batch <= SHARED_PRODUCT_LIMIT
        )

    @property
    def is_whole_batch(self) -> bool:
        return self.size == self.batch

    def unit(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image, text, all_image, all_text)`` L2-normalised once (shared by every product)."""
        if self._unit is None:
            assert self.image is not None and self.text is not None
            assert self.all_image is not None and self.all_text is not None
            img, txt = F.normalize(self.image, dim=1, eps=1e-12), F.normalize(self.text, dim=1, eps=1e-12)
            whole = self.all_image is self.image and self.all_text is self.text
            all_img = img if whole else F.normalize(self.all_image, dim=1, eps=1e-12)
            all_txt = txt if whole else F.normalize(self.all_text, dim=1, eps=1e-12)
            self._unit = (img, txt, all_img, all_txt)
        return self._unit  # type: ignore[return-value]

    def _operands(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        img, txt, all_img, all_txt = self.unit()
        return {"i2t": (img, all_txt), "t2i": (txt, all_img), "ii": (img, all_img), "tt": (txt, all_txt)}[kind]

    def _product(self, kind: str) -> torch.Tensor:
        """The unscaled ``[b, B]`` block ``kind``, computed once per forward."""
        if kind not in self._products:
            if kind == "i2t" and self.scores is not None:
                block = self.scores
            elif kind == "t2i" and self.scores is not None:
                block = self.scores.t()
            elif kind == "i2t" and self.similarity is not None:
                block = self.similarity(self.image, self.all_text)
            elif kind == "t2i" and self.similarity is not None:
                block = self.similarity(self.all_image, self.text).t()
            elif kind == "t2i" and self.is_whole_batch:
                block = self._product("i2t").t()  # one process: captions x images is the transpose
            else:
                rows, cols = self._operands(kind)
                block = rows @ cols.t()
            self._products[kind] = block
        return self._products[kind]

    def logits(self, kind: str, temperature=None) -> torch.Tensor:
        """``[b, B]`` block ``kind`` (``i2t``: image anchors x captions, ``t2i``: caption anchors x images, ``ii`` /
        ``tt``: the uni-modal cosine similarities), over ``temperature`` if given."""
        if temperature is not None and not self.share_products:
            rows, cols = self._operands(kind)
            return (rows / temperature) @ cols.t()
        block = self._product(kind)
        return block if temperature is None else block / temperature

    def i2t(self, temperature=None) -> torch.Tensor:
        return self.logits("i2t", temperature)

    def t2i(self, temperature=None) -> torch.Tensor:
        return self.logits("t2i", temperature)

    def whole(self) -> torch.Tensor:
        """The ``[B, B]`` scores of the whole batch, for a term that needs them (a miner, a custom base)."""
        if self.is_whole_batch:
            return self.i2t()
        if self.similarity is not None:
            return self.similarity(self.all_image, self.all_text)
        _, _, all_img, all_txt = self.unit()
        return all_img @ all_txt.t()

    def uni_modal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, B]`` rows of the student's image-image and text-text cosine similarities."""
        return self.logits("ii"), self.logits("tt")

    def positives(self, image_ids: torch.Tensor | None, all_image_ids: torch.Tensor | None) -> torch.Tensor:
        """``[b, B]`` (bool): the columns that show each anchor's image (its own column without ids)."""
        if image_ids is None:
            device = (self.image if self.image is not None else self.scores).device  # type: ignore[union-attr]
            cols = torch.arange(self.batch, device=device).view(1, -1)
            return cols == (torch.arange(self.size, device=device) + self.offset).view(-1, 1)
        return SF.positive_mask(image_ids, all_image_ids)

    def own_scores(self, s_i2t: torch.Tensor, s_t2i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b]`` each anchor's score with its own pair, from the ``[b, B]`` rows."""
        cols = (torch.arange(self.size, device=s_i2t.device) + self.offset).view(-1, 1)
        return s_i2t.gather(1, cols).squeeze(1), s_t2i.gather(1, cols).squeeze(1)


@dataclass
class TeacherRows:
    """The teacher side: rows of its image-image and text-text similarities for this process's anchors, formed on
    demand (one ``[b, B]`` block at a time) from unit teacher embeddings (``image`` / ``text`` ``[B, D_t]``, the
    anchors at ``offset``), or given as ``[B, B]`` matrices (``matrices=True``, one process)."""

    image_source: torch.Tensor
    text_source: torch.Tensor
    offset: int = 0
    size: int | None = None
    matrices: bool = False

    def _rows(self, e: torch.Tensor) -> torch.Tensor:
        if self.matrices:
            return e
        n = e.shape[0] if self.size is None else self.size
        return (e if n == e.shape[0] else e[self.offset : self.offset + n]) @ e.t()

    def image(self) -> torch.Tensor:
        return self._rows(self.image_source)

    def text(self) -> torch.Tensor:
        return self._rows(self.text_source)

    def whole(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``[B, B]`` matrices of the whole batch (calibration, a miner)."""
        if self.matrices:
            return self.image_source, self.text_source
        return self.image_source @ self.image_source.t(), self.text_source @ self.text_source.t()


def soft_label_targets(loss: Any, teacher: TeacherRows):
    """``(csa_targets, usa_targets)``: the soft labels of each teacher matrix (rows), each formed and turned into
    ``P`` one at a time; CSA in mode ``each`` shares USA's (the same frozen ``tau_s``, set together). None for a term
    that is off."""
    usa_t = None
    if loss.usa is not None:
        usa = loss.usa
        usa_t = (
            SF.soft_labels(teacher.image(), usa.teacher_temperature(), validate=False),
            SF.soft_labels(teacher.text(), usa.text_teacher_temperature(), validate=False),
        )
    if loss.csa is None:
        return None, usa_t
    if usa_t is not None and loss._shared_soft_labels:
        return usa_t, usa_t
    csa = loss.csa
    tau_i, tau_t = csa.teacher_temperatures()
    if csa.mode == "each":
        return (
            SF.soft_labels(teacher.image(), tau_i, validate=False),
            SF.soft_labels(teacher.text(), tau_t, validate=False),
        ), usa_t
    return csa.soft_labels(teacher.image(), teacher.text()), usa_t


def _unit_head(module, x: torch.Tensor, dtype) -> torch.Tensor:
    return F.normalize(module(x.to(dtype)).to(x.dtype), dim=1, eps=1e-8)


def row_terms(
    loss: Any,
    rows: AnchorRows,
    image_ids: torch.Tensor | None,
    all_image_ids: torch.Tensor | None,
    teacher: TeacherRows | None,
    features: tuple[torch.Tensor, ...] | None,
    base_temperature=None,
) -> dict[str, torch.Tensor]:
    """This process's share of every switched-on term of ``loss`` (a :class:`~softalign.losses.SoftAlignLoss`)
    that is a sum over anchors, each normalised as the global term is (by the global ``B``). Terms that need the
    whole matrix (a custom base, a miner) are left to the caller.

    ``teacher``: the teacher's image-image and text-text similarities (:class:`TeacherRows`); ``features``: this
    process's ``(image, text)`` backbone features for USA's heads, or None (USA then reads the embeddings).
    """
    from softalign.losses.contrastive import InfoNCELoss, VSEHingeLoss

    n = rows.batch
    parts: dict[str, torch.Tensor] = {}
    base = loss.base
    hinge_base = isinstance(base, VSEHingeLoss)
    needs_hinge = (hinge_base and base.miner is None) or (
        loss.cmc is not None and not hinge_base and loss.cmc.miner is None
    )
    if needs_hinge:
        s_i2t, s_t2i = rows.i2t(), rows.t2i()
        own_i2t, own_t2i = rows.own_scores(s_i2t, s_t2i)
        excluded = rows.positives(image_ids, all_image_ids)
    if hinge_base and base.miner is None:
        total = SF.vsepp_hinge_rows(
            s_i2t, s_t2i, own_i2t, own_t2i, excluded, excluded, base.margin, base.max_violation
        )
        parts["base"] = total if base.reduction == "sum" else total / n
    elif isinstance(base, InfoNCELoss):
        tau = base.temperature() if base_temperature is None else base_temperature
        total = SF.info_nce_rows(rows.i2t(tau), rows.t2i(tau), image_ids, all_image_ids, rows.offset) / n
        parts["base"] = total / n if base.reduction == "cusa_mean" else total
    soft_scale = float(n) if loss.soft_label_reduction == "sum" else 1.0
    csa_targets, usa_targets = soft_label_targets(loss, teacher) if teacher is not None else (None, None)
    if loss.csa is not None and csa_targets is not None:
        tau_i, tau_t = loss.csa.temperatures()
        csa = SF.soft_label_kl_rows(rows.i2t(tau_i), csa_targets[0]) + SF.soft_label_kl_rows(
            rows.t2i(tau_t), csa_targets[1]
        )
        parts["csa"] = soft_scale * csa / (2.0 * n)
    if loss.usa is not None and usa_targets is not None:
        usa = loss.usa
        tau_i, tau_t = usa.image_temperature(), usa.text_temperature()
        if usa.embed_dim is None and features is None:  # no heads: the student's own uni-modal similarities
            u_img, u_txt = rows.logits("ii", tau_i), rows.logits("tt", tau_t)
        else:
            f_img, f_txt = features if features is not None else (rows.image, rows.text)
            assert f_img is not None and f_txt is not None  # checked at the loss's boundary
            dtype = usa._head_dtype(f_img.dtype)
            # the heads run on this process's rows; their outputs are gathered (not the features), so that the
            # heads' activations held for backward are [b, D], not [B, D]
            h_img, h_txt = _unit_head(usa.image_head, f_img, dtype), _unit_head(usa.text_head, f_txt, dtype)
            u_img = (h_img / tau_i) @ rows.columns(h_img).t()
            u_txt = (h_txt / tau_t) @ rows.columns(h_txt).t()
        value = SF.soft_label_kl_rows(u_img, usa_targets[0]) + SF.soft_label_kl_rows(u_txt, usa_targets[1])
        parts["usa"] = soft_scale * value / (2.0 * n)
    if loss.cmc is not None and (hinge_base or loss.cmc.miner is None):
        # TGDT's intra term sums over columns j the max over rows i of |S_tt - S_ii|; both matrices are symmetric,
        # so column j's max is row j's: a process sums the rows of its anchors
        intra = SF.intra_modal_consistency_rows(*rows.uni_modal(), margin=loss.cmc.intra_margin)
        if hinge_base:
            parts["cmc"] = intra  # on a hinge base the base is CMC's inter term: CMC adds only the intra term
        else:
            inter = SF.vsepp_hinge_rows(s_i2t, s_t2i, own_i2t, own_t2i, excluded, excluded, loss.cmc.margin, True)
            parts["cmc"] = inter + intra
    return parts
