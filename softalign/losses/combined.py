"""The one-line module: base loss + alpha * CSA + beta * USA (+ gamma * CMC), distributed-aware."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from softalign import distributed as dist_utils
from softalign import functional as SF
from softalign.losses._inputs import check_embeddings, default_similarity
from softalign.losses.cmc import CMCLoss
from softalign.losses.contrastive import InfoNCELoss, VSEHingeLoss
from softalign.losses.csa import CSALoss
from softalign.losses.usa import USALoss
from softalign.mining import NegativeMiner, TeacherFilteredMiner

BASES = ("vsepp", "vsepp_sum", "infonce", "none")


class SoftAlignLoss(nn.Module):
    """``L = L_base + alpha * L_CSA + beta * L_USA + gamma * L_CMC`` for one batch of (image, caption) pairs.

    Add it to an existing trainer with one line::

        criterion = SoftAlignLoss(embed_dim=1024, cache=TeacherCache.load("cache/"))
        optimizer.add_param_group({"params": criterion.parameters()})   # heads + temperatures
        loss = criterion(img_emb, cap_emb, ids=caption_ids)

    Inputs (``forward``):
        image_emb, text_emb: ``[B, D]`` student embeddings of the B pairs (row p: the image of caption p).
        ids: ``[B]`` global caption ids; with a ``cache`` they give the positives (via the caption->image map)
            and the teacher similarities.
        scores: ``[B, B]`` precomputed image x caption scores (SCAN/TERAN cross-attention); used instead of the
            embeddings' cosine product for the base loss, CSA and CMC's inter term. USA and CMC's intra term
            still need (pooled) embeddings.
        image_ids: ``[B]`` image ids, when there is no cache (else derived from ``ids``); default: the diagonal.
        teacher_image_sim, teacher_text_sim: ``[B, B]`` teacher similarities, when there is no cache; or
        teacher_image_emb, teacher_text_emb: ``[B, D_t]`` teacher embeddings (gathered across processes).

    Distributed: when ``torch.distributed`` is initialised and ``gather=True``, embeddings are all-gathered with
    exact gradients (:mod:`softalign.distributed`), ids and teacher rows alongside, and every term is computed on
    the global batch. Precomputed ``scores`` cannot be gathered and stay per-process.

    Base losses: ``"vsepp"`` (hinge, max violation, margin 0.2), ``"vsepp_sum"`` (sum of hinges), ``"infonce"``
    (symmetric, temperature 0.05 learnable; ``infonce_reduction="mean"`` is CUSA's mean mode, CE / B, the scale its
    alpha/beta were tuned against), ``"none"``, or any module called as
    ``base(scores=S, image_ids=ids)``. Defaults of the soft-label terms follow CUSA (alpha 0.1, beta 0.5).

    Returns the scalar total, or with ``return_parts=True`` (constructor default, or per call) a dict
    ``{"loss", "base", "csa", "usa", "cmc"}`` of the total and the unweighted parts that are switched on.
    Everything is computed in fp32, also under a caller's ``torch.autocast``. The terms run through fused
    autograd functions with analytic first-order gradients (double backward is not supported).
    """

    citation = (
        "Huang et al., Cross-modal and Uni-modal Soft-label Alignment for Image-Text Retrieval, AAAI 2024; "
        "Liu et al., Efficient Token-Guided Image-Text Retrieval with Consistent Multimodal Contrastive Training, "
        "IEEE TIP 2023; Faghri et al., VSE++, BMVC 2018"
    )

    def __init__(
        self,
        embed_dim: Optional[Union[int, Tuple[int, int]]] = None,
        base: Union[str, nn.Module] = "vsepp",
        alpha: float = 0.1,
        beta: float = 0.5,
        gamma: float = 0.0,
        *,
        cache: Any = None,
        margin: float = 0.2,
        miner: Optional[NegativeMiner] = None,
        temperature: float = 0.05,
        infonce_reduction: str = "sum",
        csa_mode: str = "each",
        csa_temperature: float = 0.45,
        usa_temperature: float = 0.45,
        teacher_temperature: float = 1.0,
        learn_temperatures: bool = True,
        cmc_intra_margin: float = 0.3,
        gather: bool = True,
        return_parts: bool = False,
        similarity=None,
    ):
        super().__init__()
        for name, w in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if not float(w) >= 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.cache, self.miner, self.gather, self.return_parts = cache, miner, bool(gather), bool(return_parts)
        self.similarity = similarity if similarity is not None else default_similarity()
        self._cosine = _is_plain_cosine(self.similarity)
        self._config = dict(embed_dim=embed_dim, base=base if isinstance(base, str) else type(base).__name__,
                            alpha=alpha, beta=beta, gamma=gamma, margin=margin, temperature=temperature,
                            infonce_reduction=infonce_reduction,
                            csa_mode=csa_mode, csa_temperature=csa_temperature, usa_temperature=usa_temperature,
                            teacher_temperature=teacher_temperature, learn_temperatures=learn_temperatures,
                            cmc_intra_margin=cmc_intra_margin, gather=gather, return_parts=return_parts)

        if isinstance(base, nn.Module):
            self.base = base
        elif base in ("vsepp", "vsepp_sum"):
            self.base = VSEHingeLoss(margin, max_violation=(base == "vsepp"), miner=miner, similarity=self.similarity)
        elif base == "infonce":
            self.base = InfoNCELoss(temperature, learn_temperature=learn_temperatures, similarity=self.similarity,
                                    reduction=infonce_reduction)
        elif base == "none":
            self.base = None
        else:
            raise ValueError(f"base must be one of {BASES} or an nn.Module, got {base!r}")
        self.csa = CSALoss(csa_mode, csa_temperature, learn_temperature=learn_temperatures,
                           teacher_temperature=teacher_temperature, similarity=self.similarity) if alpha > 0 else None
        self.usa = USALoss(embed_dim, usa_temperature, learn_temperature=learn_temperatures,
                           teacher_temperature=teacher_temperature) if beta > 0 else None
        self.cmc = CMCLoss(margin, cmc_intra_margin, miner=miner, similarity=self.similarity) if gamma > 0 else None

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Dict[str, Any], **objects) -> "SoftAlignLoss":
        """Rebuild from :meth:`get_config_dict`; objects (``cache``, ``miner``, ``similarity``) go as keywords."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        config = {k: v for k, v in config.items() if k != "miner"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown SoftAlignLoss option(s) {unknown}; allowed: {sorted(known)}")
        return cls(**{**config, **objects})

    def get_config_dict(self) -> Dict[str, Any]:
        """Constructor options (sentence-transformers convention), with the miner's own config if any."""
        cfg = dict(self._config)
        if isinstance(self.base, VSEHingeLoss) and cfg["base"] in ("vsepp", "vsepp_sum"):
            # an integration shim may have adopted the upstream trainer's hinge settings: report the live ones
            cfg["base"] = "vsepp" if self.base.max_violation else "vsepp_sum"
            if self.cmc is None:
                cfg["margin"] = self.base.margin
        if self.miner is not None:
            cfg["miner"] = self.miner.get_config_dict()
        return cfg

    def _needs_teacher(self) -> bool:
        return self.csa is not None or self.usa is not None or _uses_teacher(self.miner)

    # ------------------------------------------------------------------------------------------
    def forward(self, image_emb=None, text_emb=None, ids=None, *, scores=None, image_ids=None,
                teacher_image_sim=None, teacher_text_sim=None, teacher_image_emb=None, teacher_text_emb=None,
                return_parts: Optional[bool] = None):
        device = (scores if scores is not None else image_emb if image_emb is not None else text_emb)
        device = device.device if isinstance(device, torch.Tensor) else torch.device("cpu")
        # Under a caller's autocast the matmuls would run in fp16/bf16: the loss computes in fp32.
        with torch.autocast(device.type, enabled=False):
            out = self._forward(image_emb, text_emb, ids, scores, image_ids, teacher_image_sim, teacher_text_sim,
                                teacher_image_emb, teacher_text_emb)
        if self.return_parts if return_parts is None else return_parts:
            return out
        return out["loss"]

    def _forward(self, image_emb, text_emb, ids, scores, image_ids, teacher_image_sim, teacher_text_sim,
                 teacher_image_emb, teacher_text_emb) -> Dict[str, torch.Tensor]:
        have_emb = image_emb is not None and text_emb is not None
        if scores is None and not have_emb:
            raise ValueError("pass image_emb and text_emb ([B, D] each) or scores ([B, B] images x captions)")
        if have_emb:
            image_emb, text_emb = check_embeddings(image_emb, text_emb, same_dim=scores is None)
        if (self.usa is not None or self.cmc is not None) and not have_emb:
            raise ValueError("USA (beta > 0) and CMC (gamma > 0) need image_emb and text_emb (pooled embeddings) "
                             "in addition to scores")
        if ids is not None and not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids, dtype=torch.long)

        if self.gather and scores is None and dist_utils.is_distributed():
            if teacher_image_sim is not None or teacher_text_sim is not None:
                raise ValueError("teacher_image_sim / teacher_text_sim are per-process [B, B] matrices and cannot be "
                                 "gathered: pass a cache (with ids) or teacher_image_emb / teacher_text_emb")
            sizes = dist_utils.batch_sizes(image_emb)  # one size exchange for all the gathers of this batch
            device = image_emb.device
            image_emb = dist_utils.all_gather_with_grad(image_emb, sizes)
            text_emb = dist_utils.all_gather_with_grad(text_emb, sizes)
            ids = None if ids is None else dist_utils.gather_batch(ids.to(device), sizes)
            image_ids = None if image_ids is None else dist_utils.gather_batch(image_ids.to(device), sizes)
            teacher_image_emb = None if teacher_image_emb is None else dist_utils.gather_batch(teacher_image_emb, sizes)
            teacher_text_emb = None if teacher_text_emb is None else dist_utils.gather_batch(teacher_text_emb, sizes)

        if scores is not None:
            scores = SF.check_square_pair(scores, "scores")
            batch, device = scores.shape[0], scores.device
            if have_emb and image_emb.shape[0] != batch:
                raise ValueError(f"scores are [{batch}, {batch}] but the embeddings have {image_emb.shape[0]} rows")
        else:
            batch, device = image_emb.shape[0], image_emb.device
        image_ids = self._image_ids(ids, image_ids, batch, device)
        t_img, t_txt = (None, None)
        if self._needs_teacher():
            t_img, t_txt = self._teacher(ids, batch, device, teacher_image_sim, teacher_text_sim,
                                         teacher_image_emb, teacher_text_emb)

        # Every input is validated from here on: the terms skip their own checks; CSA and USA share the soft
        # labels of the teacher matrices.
        with SF.inputs_validated(), SF.soft_labels_cached():
            uni = None
            if scores is None and self._cosine:
                # one fused normalisation + Gram node shared by the scores and the student's uni-modal
                # similarities (CMC's intra term, and USA when it has no heads)
                need_uni = self.cmc is not None or self._usa_shares_uni(image_emb)
                scores, s_ii, s_tt = SF._cosine_similarities(image_emb, text_emb, need_uni)
                if need_uni:
                    uni = (s_ii, s_tt)
            elif scores is None:
                scores = self.similarity(image_emb, text_emb).float()
            parts = self._terms(image_emb, text_emb, scores, image_ids, t_img, t_txt, uni)
        total = scores.new_zeros(())
        for name, weight in (("base", 1.0), ("csa", self.alpha), ("usa", self.beta), ("cmc", self.gamma)):
            if name in parts:
                total = total + weight * parts[name]
        return {"loss": total, **parts}

    def _usa_shares_uni(self, image_emb) -> bool:
        """USA without heads computes the same cosine similarities as CMC's intra term (in its head dtype)."""
        return self.usa is not None and self.usa.embed_dim is None and self.usa._head_dtype() == image_emb.dtype

    def _terms(self, image_emb, text_emb, scores, image_ids, t_img, t_txt, uni=None) -> Dict[str, torch.Tensor]:
        parts: Dict[str, torch.Tensor] = {}
        if self.base is not None:
            if isinstance(self.base, (VSEHingeLoss, InfoNCELoss)):
                # miners may need the teacher similarities (TeacherFilteredMiner) or the embeddings (PMLMiner)
                parts["base"] = self.base(image_emb, text_emb, scores=scores, image_ids=image_ids,
                                          teacher_image_sim=t_img, teacher_text_sim=t_txt)
            else:  # a user's module: the documented call
                parts["base"] = self.base(scores=scores, image_ids=image_ids)
        if self.csa is not None:
            parts["csa"] = self.csa(scores=scores, teacher_image_sim=t_img, teacher_text_sim=t_txt)
        image_sim, text_sim = uni if uni is not None else (None, None)
        if self.usa is not None:
            shared = uni if self._usa_shares_uni(image_emb) else (None, None)
            parts["usa"] = self.usa(image_emb, text_emb, teacher_image_sim=t_img, teacher_text_sim=t_txt,
                                    image_sim=shared[0], text_sim=shared[1])
        if self.cmc is not None:
            if self._cmc_inter_is_base() and "base" in parts:
                # CMC's inter term is the very hinge the base loss computed (same scores, ids, margin, no miner)
                intra = SF.intra_modal_consistency(
                    *(uni if uni is not None else (SF.cosine_similarity_matrix(image_emb),
                                                   SF.cosine_similarity_matrix(text_emb))),
                    margin=self.cmc.intra_margin)
                parts["cmc"] = parts["base"] + intra
            else:
                parts["cmc"] = self.cmc(image_emb, text_emb, scores=scores, image_ids=image_ids,
                                        teacher_image_sim=t_img, teacher_text_sim=t_txt, image_sim=image_sim,
                                        text_sim=text_sim)
        return parts

    def _cmc_inter_is_base(self) -> bool:
        base = self.base
        return (type(base) is VSEHingeLoss and base.max_violation and base.miner is None and self.cmc.miner is None
                and base.reduction == "sum" and base.margin == self.cmc.margin)

    # ------------------------------------------------------------------------------------------
    def _image_ids(self, ids, image_ids, batch, device):
        if image_ids is not None:
            image_ids = torch.as_tensor(image_ids).to(device)
            if image_ids.shape != (batch,):
                raise ValueError(f"image_ids must have shape [{batch}], got {tuple(image_ids.shape)}")
            return image_ids
        if ids is not None:
            if ids.shape != (batch,):
                raise ValueError(f"ids must have shape [{batch}] (one caption id per pair), got {tuple(ids.shape)}")
            if self.cache is None:
                raise ValueError("ids are caption ids: pass image_ids too, or give the loss a cache that maps "
                                 "captions to images")
            return torch.as_tensor(self.cache.image_ids(ids)).to(device)
        return None  # diagonal positives

    def _teacher(self, ids, batch, device, t_img, t_txt, e_img, e_txt):
        if t_img is not None or t_txt is not None:
            if t_img is None or t_txt is None:
                raise ValueError("pass both teacher_image_sim and teacher_text_sim")
        elif e_img is not None or e_txt is not None:
            if e_img is None or e_txt is None:
                raise ValueError("pass both teacher_image_emb and teacher_text_emb")
            t_img = SF.cosine_similarity_matrix(e_img.to(device))
            t_txt = SF.cosine_similarity_matrix(e_txt.to(device))
        elif self.cache is not None:
            if ids is None:
                raise ValueError("the soft-label terms need ids (global caption ids) to look up the teacher cache")
            sims = self.cache.similarities(ids, device=device)
            t_img, t_txt = sims[0], sims[1]
        else:
            raise ValueError("the soft-label terms need teacher similarities: give the loss a cache and pass ids, or "
                             "pass teacher_image_sim/teacher_text_sim (or teacher_image_emb/teacher_text_emb)")
        t_img = SF.check_square_pair(t_img, "teacher_image_sim", batch).to(device)
        t_txt = SF.check_square_pair(t_txt, "teacher_text_sim", batch).to(device)
        return t_img, t_txt


def _is_plain_cosine(similarity) -> bool:
    """True for pytorch-metric-learning's default CosineSimilarity (the fused fast path is then exact)."""
    from pytorch_metric_learning.distances import CosineSimilarity

    return (type(similarity) is CosineSimilarity and similarity.normalize_embeddings and similarity.p == 2
            and similarity.power == 1 and not getattr(similarity, "collect_stats", False))


def _uses_teacher(miner) -> bool:
    if miner is None:
        return False
    if isinstance(miner, TeacherFilteredMiner):
        return True
    return _uses_teacher(getattr(miner, "inner", None))
