"""The one-line module: base loss + alpha * CSA + beta * USA (+ gamma * CMC), distributed-aware."""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softalign import distributed as dist_utils
from softalign import functional as SF
from softalign.losses import citations
from softalign.losses._inputs import (
    ChecksValuesOnce,
    assert_finite,
    check_embeddings,
    default_similarity,
    is_plain_cosine,
)
from softalign.losses.anchor_rows import AnchorRows, TeacherRows, row_terms
from softalign.losses.cmc import CMCLoss
from softalign.losses.contrastive import InfoNCELoss, VSEHingeLoss
from softalign.losses.csa import CSALoss
from softalign.losses.soft_weight import soft_weight_from_config
from softalign.losses.usa import USALoss
from softalign.mining import NegativeMiner, TeacherFilteredMiner
from softalign.soft_labels import DEFAULT_SOFT_LABEL_ENTROPY
from softalign.teacher_inputs import TeacherEmbeddings, TeacherSimilarities

BASES = ("vsepp", "vsepp_sum", "infonce", "none")

#: Default ``(alpha, beta)`` per base loss, chosen so that CSA + USA carry about half of the gradient norm at the
#: calibrated soft labels, which gave the best validation rsum on the demo for every base (docs/losses.md "Term balance";
#: validation split cut from training, 3 seeds). CUSA's own values stay for its InfoNCE mean mode (CE / B). The
#: hinge bases sum over anchors, so the KL terms are summed over anchors too (``soft_label_reduction="auto"``).
DEFAULT_WEIGHTS: dict[str, tuple[float, float]] = {
    "infonce_cusa_mean": (0.1, 0.5),  # CUSA, Huang et al. AAAI 2024 (configs: contrastive_loss_mode mean)
    "infonce_ce": (10.0, 10.0),  # CE averaged over anchors: equals CUSA's balance up to a factor ~1/B
    "vsepp": (3.0, 3.0),
    "vsepp_sum": (10.0, 10.0),
    "none": (1.0, 1.0),
    "custom": (1.0, 1.0),  # scale unknown: check loss.gradient_shares (a warning fires under 1%)
}


def _base_key(base, infonce_reduction: str) -> str:
    if isinstance(base, nn.Module):
        if isinstance(base, VSEHingeLoss) and base.reduction == "sum":
            return "vsepp" if base.max_violation else "vsepp_sum"
        if isinstance(base, InfoNCELoss):
            return f"infonce_{base.reduction}"
        return "custom"
    if base == "infonce":
        return f"infonce_{SF.infonce_reduction(infonce_reduction)}"
    if base in ("vsepp", "vsepp_sum", "none"):
        return base
    raise ValueError(f"base must be one of {BASES} or an nn.Module, got {base!r}")


def default_weights(base: str | nn.Module = "vsepp", infonce_reduction: str = "ce") -> tuple[float, float]:
    """The ``(alpha, beta)`` that :class:`SoftAlignLoss` takes for ``base`` when they are left unset
    (:data:`DEFAULT_WEIGHTS`); recipes resolve unset weights through it."""
    if base == "infonce" or infonce_reduction in ("sum", "mean"):
        infonce_reduction = SF.infonce_reduction(infonce_reduction)
    return DEFAULT_WEIGHTS[_base_key(base, infonce_reduction)]


def _as_id_tensor(ids, name: str) -> torch.Tensor:
    """Caption ids (list, numpy array, tensor) -> int64 tensor; fractional or non-finite values are refused."""
    t = torch.as_tensor(ids)
    if t.dtype == torch.long:
        return t
    if t.is_floating_point():
        if not torch.isfinite(t).all() or not torch.equal(t, t.round()):
            bad = (~torch.isfinite(t) | (t != t.round())).nonzero()[0].tolist()
            raise ValueError(
                f"{name} must be integer caption ids; got {t.dtype} with a fractional or non-finite "
                f"value at index {tuple(bad)}"
            )
    elif t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be integer caption ids, got dtype {t.dtype}")
    return t.long()


class SoftAlignLoss(ChecksValuesOnce, nn.Module):
    """``L = L_base + alpha * L_CSA + beta * L_USA + gamma * L_CMC`` for one batch of (image, caption) pairs.

    Add it to an existing trainer with one line::

        criterion = SoftAlignLoss(embed_dim=1024, cache=TeacherCache.load("cache/"))
        optimizer.add_param_group({"params": criterion.parameters()})   # heads + temperatures
        loss = criterion(img_emb, cap_emb, ids=caption_ids)

    Inputs (``forward``):
        image_emb, text_emb: ``[B, D]`` student embeddings of the B pairs (row p: the image of caption p).
        ids: ``[B]`` global caption ids; with a cache they give the positives (via the caption->image map)
            and the teacher similarities.
        teacher: where the soft labels come from, when not the loss's own ``cache``: another cache,
            ``TeacherEmbeddings(image, text)`` (``[B, D_t]`` each, gathered across processes) or
            ``TeacherSimilarities(image, text)`` (``[B, B]`` each, one process); see :mod:`softalign.teacher_inputs`.
        scores: ``[B, B]`` precomputed image x caption scores (SCAN/TERAN cross-attention); used instead of the
            embeddings' cosine product for the base loss, CSA and CMC's inter term. USA and CMC's intra term
            still need (pooled) embeddings.
        image_ids: ``[B]`` image ids, when there is no cache (else derived from ``ids``); default: the diagonal.

    Distributed: when ``torch.distributed`` is initialised and ``gather=True``, embeddings are all-gathered with
    exact gradients (:mod:`softalign.distributed`), ids and teacher rows alongside, and every term is computed on
    the global batch. Precomputed ``scores`` cannot be gathered and stay per-process.

    Base losses: ``"vsepp"`` (hinge, max violation, margin 0.2; the default), ``"vsepp_sum"`` (sum of hinges), ``"infonce"``
    (symmetric, temperature 0.05 learnable; ``infonce_reduction="cusa_mean"`` is CUSA's mean mode, CE / B, the scale its
    alpha/beta were tuned against), ``"none"``, or any module called as
    ``base(scores=S, image_ids=ids)``. ``alpha`` / ``beta`` default per base (:data:`DEFAULT_WEIGHTS`). When
    ``base`` / ``margin`` are left unset and a shim puts the loss into a VSE++ or SCAN trainer, the hinge takes
    that trainer's own ``--margin`` / ``--max_violation`` (and the weights follow the adopted base) without a
    warning; settings stated here that differ from the trainer's are adopted with a warning naming both.

    Returns the scalar total, or with ``return_parts=True`` (constructor default, or per call) a dict
    ``{"loss", "base", "csa", "usa", "cmc"}`` of the total and the unweighted parts that are switched on.
    Everything is computed in fp32, also under a caller's ``torch.autocast``, with plain autograd (gradients of any
    order, ``torch.func``). The inputs' values (NaN/inf/overflow) are checked on the first forward, the only host
    sync of a step (``check_values_always = True`` checks every call); the soft-label targets of each teacher
    matrix are computed once per forward and passed to CSA and USA.
    """

    citation = citations.join(citations.CUSA, citations.TGDT, citations.VSEPP)

    def __init__(
        self,
        embed_dim: int | tuple[int, int] | None = None,
        base: str | nn.Module | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        gamma: float = 0.0,
        *,
        cache: Any = None,
        margin: float | None = None,
        miner: NegativeMiner | None = None,
        temperature: float = 0.05,
        infonce_reduction: str = "ce",
        csa_mode: str = "each",
        csa_temperature: float = 0.45,
        usa_temperature: float = 0.45,
        teacher_temperature: str | float | tuple[float, float] = "auto",
        soft_label_entropy: float = DEFAULT_SOFT_LABEL_ENTROPY,
        soft_label_reduction: str = "auto",
        learn_temperatures: bool = True,
        cmc_intra_margin: float = 0.3,
        gather: bool = True,
        return_parts: bool = False,
        similarity=None,
        diagnostics_every: int = 100,
        soft_weight=None,
    ):
        super().__init__()
        #: which hinge / weight settings the caller stated; an integration shim adopts an upstream trainer's own
        #: criterion silently where nothing was stated (base None -> "vsepp", margin None -> 0.2, weights None)
        self._stated = {
            "base": base is not None,
            "margin": margin is not None,
            "alpha": alpha is not None,
            "beta": beta is not None,
        }
        base = "vsepp" if base is None else base
        margin = 0.2 if margin is None else margin
        if base == "infonce":
            infonce_reduction = SF.infonce_reduction(infonce_reduction)
        base_key = _base_key(base, infonce_reduction)
        default_alpha, default_beta = default_weights(base, infonce_reduction)
        alpha = default_alpha if alpha is None else alpha
        beta = default_beta if beta is None else beta
        if soft_label_reduction not in ("auto", "batchmean", "sum"):
            raise ValueError(
                f"soft_label_reduction must be 'auto', 'batchmean' or 'sum', got {soft_label_reduction!r}"
            )
        if soft_label_reduction == "auto":
            soft_label_reduction = "sum" if base_key in ("vsepp", "vsepp_sum") else "batchmean"
        self.soft_label_reduction = soft_label_reduction
        auto_tau = isinstance(teacher_temperature, str)
        if auto_tau and teacher_temperature != "auto":
            raise ValueError(
                f"teacher_temperature must be 'auto', a float or an (image, text) pair, got {teacher_temperature!r}"
            )
        if not 0.0 < float(soft_label_entropy) < 1.0:
            raise ValueError(f"soft_label_entropy must lie in (0, 1) (a fraction of log B), got {soft_label_entropy}")
        self.soft_label_entropy = float(soft_label_entropy)
        #: the calibrated soft-label temperatures and how they were chosen (a dict) once :meth:`calibrate` ran; None
        #: while uncalibrated or with a fixed teacher_temperature
        self.calibration: dict[str, Any] | None = None
        if int(diagnostics_every) < 0:
            raise ValueError(f"diagnostics_every must be >= 0 (0: never), got {diagnostics_every}")
        #: how CSA's and USA's weights move over training (:mod:`softalign.losses.soft_weight`; None: constant)
        self.soft_weight = soft_weight_from_config(soft_weight)
        self._soft_scale = 1.0
        needed = getattr(self.soft_weight, "every", None)
        self.diagnostics_every = (
            int(diagnostics_every)
            if not needed
            else (needed if not diagnostics_every else math.gcd(int(diagnostics_every), needed))
        )
        self._steps = 0
        self._warned_low_share = False
        self._warned_single_pair = False
        #: the last gradient-share diagnostic (:func:`softalign.losses.diagnostics.gradient_shares`), or None
        self.gradient_shares: dict[str, float] | None = None
        for name, w in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if not float(w) >= 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.cache, self.miner, self.gather, self.return_parts = cache, miner, bool(gather), bool(return_parts)
        self.similarity = similarity if similarity is not None else default_similarity()
        self._cosine = is_plain_cosine(self.similarity)
        self._config: dict[str, Any] = dict(
            embed_dim=embed_dim,
            base=base if isinstance(base, str) else type(base).__name__,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            margin=margin,
            temperature=temperature,
            infonce_reduction=infonce_reduction,
            csa_mode=csa_mode,
            csa_temperature=csa_temperature,
            usa_temperature=usa_temperature,
            teacher_temperature=teacher_temperature,
            soft_label_entropy=soft_label_entropy,
            soft_label_reduction=soft_label_reduction,
            learn_temperatures=learn_temperatures,
            cmc_intra_margin=cmc_intra_margin,
            gather=gather,
            return_parts=return_parts,
            diagnostics_every=diagnostics_every,
        )
        if self.soft_weight is not None:
            self._config["soft_weight"] = self.soft_weight.get_config_dict()

        self.base: nn.Module | None
        if isinstance(base, nn.Module):
            self.base = base
        elif base in ("vsepp", "vsepp_sum"):
            self.base = VSEHingeLoss(margin, max_violation=(base == "vsepp"), miner=miner, similarity=self.similarity)
        elif base == "infonce":
            self.base = InfoNCELoss(
                temperature,
                learn_temperature=learn_temperatures,
                similarity=self.similarity,
                reduction=infonce_reduction,
            )
        elif base == "none":
            self.base = None
        else:
            raise ValueError(f"base must be one of {BASES} or an nn.Module, got {base!r}")
        # placeholder until calibrate() sets the values
        fixed_tau: float | tuple[float, float] = 1.0 if isinstance(teacher_temperature, str) else teacher_temperature
        self.csa = (
            CSALoss(
                csa_mode,
                csa_temperature,
                learn_temperature=learn_temperatures,
                teacher_temperature=fixed_tau,
                similarity=self.similarity,
            )
            if alpha > 0
            else None
        )
        self.usa = (
            USALoss(embed_dim, usa_temperature, learn_temperature=learn_temperatures, teacher_temperature=fixed_tau)
            if beta > 0
            else None
        )
        self._needs_calibration = auto_tau and (self.csa is not None or self.usa is not None)
        self.cmc = CMCLoss(margin, cmc_intra_margin, miner=miner, similarity=self.similarity) if gamma > 0 else None
        # CSA (mode "each") and USA read the same teacher matrices at the same frozen tau_s (CUSA's
        # use_cross_softlabel_same_softlabel_tau): this loss sets both pairs together (constructor, calibrate), so
        # the soft labels are computed once per forward and passed to both (open_clip's DistillClipLoss style). Each
        # term keeps its own buffers: a state dict without shared tensors saves as safetensors.
        self._shared_soft_labels = self.csa is not None and self.usa is not None and self.csa.mode == "each"
        for term in (self.base, self.csa, self.usa, self.cmc):
            if isinstance(term, ChecksValuesOnce):
                term._values_checked = True  # this loss checks its inputs once, at its boundary
                term._owned = True  # and its total on every call

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any], **objects) -> SoftAlignLoss:
        """Rebuild from :meth:`get_config_dict`, calibration included (the calibrated ``tau_s`` and its record);
        objects (``cache``, ``miner``, ``similarity``, a custom ``base`` module) go as keywords. A config that names
        a miner is refused without the miner object: a config cannot carry it."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        config = dict(config)
        miner = config.pop("miner", None)
        calibration = config.pop("calibration", None)
        if miner is not None and objects.get("miner") is None:
            name = miner.get("name", miner) if isinstance(miner, dict) else miner
            raise ValueError(
                f"the config names a miner ({name!r}), an object a config cannot carry: pass it, "
                "SoftAlignLoss.from_config(config, miner=...)"
            )
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown SoftAlignLoss option(s) {unknown}; allowed: {sorted(known)}")
        loss = cls(**{**config, **objects})
        if calibration is not None:  # teacher_temperature holds the calibrated (image, text) pair already
            loss.calibration = dict(calibration)
            if "csa_fused" in calibration and loss.csa is not None:
                loss.csa.set_teacher_temperatures(calibration["csa_fused"], calibration["csa_fused"])
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        """Constructor options (sentence-transformers convention), with the miner's own config if any; after
        calibration ``teacher_temperature`` holds the calibrated ``(image, text)`` values and ``calibration`` how
        they were chosen; ``alpha`` / ``beta`` are the resolved weights."""
        cfg: dict[str, Any] = dict(self._config)
        cfg["alpha"], cfg["beta"] = self.alpha, self.beta
        cfg["soft_label_reduction"] = self.soft_label_reduction
        if isinstance(self.base, VSEHingeLoss) and cfg["base"] in ("vsepp", "vsepp_sum"):
            # an integration shim may have adopted the upstream trainer's hinge settings: report the live ones
            cfg["base"] = "vsepp" if self.base.max_violation else "vsepp_sum"
            if self.cmc is None:
                cfg["margin"] = self.base.margin
        if self.miner is not None:
            cfg["miner"] = self.miner.get_config_dict()
        if self.calibration is not None:
            cfg["teacher_temperature"] = (self.calibration["image"], self.calibration["text"])
            cfg["calibration"] = dict(self.calibration)
        return cfg

    def _needs_teacher(self) -> bool:
        return self.csa is not None or self.usa is not None or _uses_teacher(self.miner)

    # ------------------------------------------------------------------------------------------ calibration
    def calibrate(
        self,
        cache=None,
        batch_size: int | None = None,
        *,
        teacher_image_sim=None,
        teacher_text_sim=None,
        num_batches: int = 16,
        seed: int = 0,
    ) -> dict[str, Any] | None:
        """Choose the soft-label temperature ``tau_s`` of each teacher matrix once (``teacher_temperature="auto"``).

        ``tau_s`` makes the mean normalised entropy of ``softmax(T / tau_s)`` equal ``soft_label_entropy`` at the
        training ``batch_size`` (:mod:`softalign.soft_labels`), computed from ``num_batches`` random
        batches of the cache (default: the loss's own), or from given ``[B, B]`` / ``[N, B, B]`` teacher
        matrices. CSA's ``add`` / ``dot`` modes calibrate their fused matrix. Returns the record, also kept in
        :attr:`calibration` and :meth:`get_config_dict`, and saved with the state dict. Called automatically at
        the first forward (with that batch's size) when not called before.
        """
        from softalign import soft_labels as cal

        if self.csa is None and self.usa is None:
            return None
        if teacher_image_sim is not None or teacher_text_sim is not None:
            if teacher_image_sim is None or teacher_text_sim is None:
                raise ValueError("pass both teacher_image_sim and teacher_text_sim to calibrate from matrices")
            t_img, t_txt = cal._as_batches(teacher_image_sim), cal._as_batches(teacher_text_sim)
            record = {"batch_size": int(t_img.shape[-1]), "num_batches": int(t_img.shape[0]), "source": "batch"}
        else:
            cache = cache if cache is not None else self.cache
            if cache is None:
                raise ValueError("calibrate needs a teacher cache or teacher_image_sim / teacher_text_sim")
            if batch_size is None:
                raise ValueError("calibrate(cache) needs the training batch_size (the global batch under gather)")
            ids, t_img, t_txt = cal.cache_batches(cache, batch_size, num_batches, seed)
            record = {
                "batch_size": int(ids.shape[1]),
                "num_batches": int(num_batches),
                "seed": int(seed),
                "source": "cache",
            }
        target = self.soft_label_entropy
        tau_img = cal.calibrate_temperature(t_img, target)
        tau_txt = cal.calibrate_temperature(t_txt, target)
        record.update(image=tau_img, text=tau_txt, target_entropy=target)
        if self.usa is not None:
            self.usa.set_teacher_temperatures(tau_img, tau_txt)
        if self.csa is not None:
            if self.csa.mode == "each":
                self.csa.set_teacher_temperatures(tau_img, tau_txt)
            else:
                fused = SF.combine_teacher_similarities(t_img, t_txt, self.csa.mode)[0]  # element-wise: [N, B, B]
                tau_csa = cal.calibrate_temperature(fused, target)
                self.csa.set_teacher_temperatures(tau_csa, tau_csa)
                record["csa_fused"] = tau_csa
        self.calibration = record
        self._needs_calibration = False
        return record

    def get_extra_state(self) -> torch.Tensor:
        """The calibration record, the training-step counter (which schedules the gradient-share diagnostic) and the
        last gradient shares as JSON in a uint8 tensor: a state dict of tensors only, so that it saves as safetensors
        (``transformers.Trainer``, accelerate) and loads with ``weights_only=True``; a resumed loss continues as an
        uninterrupted one."""
        import json

        data = json.dumps(
            {
                "calibration": self.calibration,
                "steps": self._steps,
                "gradient_shares": self.gradient_shares,
                "soft_weight": None if self.soft_weight is None else self.soft_weight.state_dict(),
            },
            sort_keys=True,
        ).encode("utf-8")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor):  # the JSON tensor of get_extra_state
            import json

            state = json.loads(bytes(state.to(torch.uint8).cpu().tolist()).decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError(f"SoftAlignLoss state: expected the JSON record of get_extra_state, got {type(state)}")
        if state.get("calibration") is not None:
            self.calibration = dict(state["calibration"])
            self._needs_calibration = False
        self._steps = int(state.get("steps", 0))
        self.gradient_shares = state.get("gradient_shares")
        if self.soft_weight is not None and state.get("soft_weight") is not None:
            self.soft_weight.load_state_dict(state["soft_weight"])

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        image_emb=None,
        text_emb=None,
        ids=None,
        *,
        teacher=None,
        scores=None,
        image_ids=None,
        image_features=None,
        text_features=None,
        return_parts: bool | None = None,
        base_temperature=None,
    ):
        """``image_features`` / ``text_features``: ``[B, D_i]`` / ``[B, D_t]`` backbone features for USA (CUSA's
        layout: the uni-modal heads run parallel to the cross-modal head, so USA's gradient never reaches it);
        without them USA uses ``image_emb`` / ``text_emb``. ``base_temperature``: the InfoNCE base's temperature
        for this call in place of its own, e.g. ``1 / logit_scale`` of a CLIP model (its gradient flows back)."""
        if base_temperature is not None and not isinstance(self.base, InfoNCELoss):
            raise ValueError(
                f"base_temperature is the temperature of an InfoNCE base; this loss's base is {self._config['base']!r}"
            )
        device = scores if scores is not None else image_emb if image_emb is not None else text_emb
        device = device.device if isinstance(device, torch.Tensor) else torch.device("cpu")
        inputs = [
            t
            for t in (image_emb, text_emb, scores, image_features, text_features)
            if isinstance(t, torch.Tensor) and t.requires_grad
        ]
        if self.soft_weight is not None and self.training:
            self._soft_scale = float(self.soft_weight.scale(self._steps))
        # Under a caller's autocast the matmuls would run in fp16/bf16: the loss computes in fp32.
        with torch.autocast(device.type, enabled=False):
            out = self._forward(
                image_emb,
                text_emb,
                ids,
                scores,
                image_ids,
                teacher,
                image_features,
                text_features,
                base_temperature,
            )
        assert_finite(out["loss"], type(self).__name__)
        if self.training and torch.is_grad_enabled() and inputs:
            if self.diagnostics_every and self._steps % self.diagnostics_every == 0:
                self._diagnose(out, inputs)
            self._steps += 1
        if self.return_parts if return_parts is None else return_parts:
            return out
        return out["loss"]

    def _install_gradient_sync(self) -> None:
        """Hooks averaging the loss's own parameter gradients over processes (data parallelism does not see these
        parameters; with local rows each process holds ``world x`` its share of them)."""
        if getattr(self, "_grad_sync_installed", False):
            return
        self._grad_sync_installed = True

        def average(grad: torch.Tensor) -> torch.Tensor:
            if not dist_utils.is_distributed():
                return grad
            import torch.distributed as dist

            grad = grad.clone()
            dist.all_reduce(grad)
            return grad / dist.get_world_size()

        for p in self.parameters():
            if p.requires_grad:
                p.register_hook(average)

    def _weights(self) -> dict[str, float]:
        """The weights of this step: CSA's and USA's times the ``soft_weight`` scale."""
        return {
            "base": 1.0,
            "csa": self.alpha * self._soft_scale,
            "usa": self.beta * self._soft_scale,
            "cmc": self.gamma,
        }

    def weighted_parts(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"base": L_base, "csa": alpha L_CSA, "usa": beta L_USA, "cmc": gamma L_CMC}`` from a
        ``return_parts=True`` result: the weighted terms whose sum is ``parts["loss"]``, without the total. This is
        what a host that sums a returned dict (sentence-transformers' trainer) or logs each entry should get, so
        that no term is counted twice."""
        return {name: weight * parts[name] for name, weight in self._weights().items() if name in parts}

    def _diagnose(self, out: dict[str, torch.Tensor], inputs) -> None:
        """Each weighted term's share of the gradient norm on the loss inputs (a few extra backward passes through
        the loss alone, every ``diagnostics_every`` training steps); warns once when CSA + USA carry < 1%."""
        from softalign.losses.diagnostics import gradient_shares, warn_if_soft_terms_silent

        w = self._weights()
        terms: dict[str, torch.Tensor] = {k: w[k] * out[k] for k in ("base", "csa", "usa", "cmc") if k in out}
        self.gradient_shares = gradient_shares(terms, inputs)
        if not self._warned_low_share and self.soft_weight is None:  # a schedule lowers the weights on purpose
            self._warned_low_share = warn_if_soft_terms_silent(self.gradient_shares, self._config_summary())
        if self.soft_weight is not None:
            self.soft_weight.observe(_same_on_every_process(self.gradient_shares, inputs[0].device))
            self.gradient_shares["soft_scale"] = self._soft_scale

    def _config_summary(self) -> str:
        base = self._config["base"]
        return (
            f"base={base!r}, alpha={self.alpha}, beta={self.beta}, soft_label_reduction="
            f"{self.soft_label_reduction!r}, teacher_temperature={self._teacher_tau_text()}"
        )

    def _teacher_tau_text(self) -> str:
        term = self.csa if self.csa is not None else self.usa
        if term is None:
            return "-"
        return f"({float(term.teacher_temperature.value):.4g}, {float(term.text_teacher_temperature.value):.4g})"

    def _forward(
        self,
        image_emb,
        text_emb,
        ids,
        scores,
        image_ids,
        teacher,
        image_features=None,
        text_features=None,
        base_temperature=None,
    ) -> dict[str, torch.Tensor]:
        # NaN/inf/overflow (a host sync) on the first forward and at each gradient-share diagnostic (which syncs
        # anyway); shapes and dtypes on every call
        validate = self._take_value_check() or (
            self.training and self.diagnostics_every > 0 and self._steps % self.diagnostics_every == 0
        )
        image_emb, text_emb, scores, features, ids, image_ids = self._checked_inputs(
            image_emb, text_emb, scores, image_features, text_features, ids, image_ids, validate
        )
        b = int(scores.shape[0] if scores is not None else image_emb.shape[0])
        device = (scores if scores is not None else image_emb).device

        # this process's rows and the batch's columns: gathered across processes, or the same tensors
        gathered = self.gather and scores is None and dist_utils.is_distributed()
        source = self.cache if teacher is None else teacher
        if gathered and isinstance(source, TeacherSimilarities):
            raise ValueError(
                "TeacherSimilarities are per-process [B, B] matrices and cannot be gathered: pass a cache (with ids) "
                "or teacher=TeacherEmbeddings(image, text)"
            )
        world, offset, sizes = 1, 0, None
        all_img, all_txt, all_ids, all_image_ids = image_emb, text_emb, ids, image_ids
        if gathered:
            sizes = dist_utils.batch_sizes(image_emb)  # one size exchange for all the gathers of this batch
            world, offset = len(sizes), sum(sizes[: dist_utils.rank()])
            all_img = dist_utils.all_gather_with_grad(image_emb, sizes)
            all_txt = dist_utils.all_gather_with_grad(text_emb, sizes)
            all_ids = None if ids is None else dist_utils.gather_batch(ids, sizes)
            all_image_ids = None if image_ids is None else dist_utils.gather_batch(image_ids, sizes)
        batch = sum(sizes) if sizes else b
        if batch == 1 and not self._warned_single_pair:  # from the shape: no host sync
            self._warned_single_pair = True
            warnings.warn(
                "softalign: a batch of 1 (image, caption) pair has no negatives and a 1 x 1 soft label: "
                "every term is 0 (no gradient). Use batches of several pairs (drop_last=True for the "
                "last, short batch)",
                UserWarning,
                stacklevel=4,
            )

        rows_of_teacher, looked_image_ids = None, None
        if self._needs_teacher():
            rows_of_teacher, looked_image_ids = _teacher_rows(source, all_ids, b, sizes, offset, device, validate)
        if all_image_ids is None:
            all_image_ids = looked_image_ids
        if all_image_ids is None and all_ids is not None:
            mapper = source if hasattr(source, "image_ids") else self.cache
            if mapper is None:
                raise ValueError(
                    "ids are caption ids: pass image_ids too, or give the loss a cache that maps captions to images"
                )
            all_image_ids = torch.as_tensor(mapper.image_ids(all_ids)).to(device)
        if image_ids is None and all_image_ids is not None:
            image_ids = all_image_ids[offset : offset + b]
        if rows_of_teacher is not None and self._needs_calibration:
            if hasattr(source, "lookup") and hasattr(source, "num_captions") and hasattr(source, "caption_to_image"):
                self.calibrate(source, batch_size=batch)
            else:  # no cache: the first batch's own teacher matrices, once
                whole = rows_of_teacher.whole()
                self.calibrate(teacher_image_sim=whole[0], teacher_text_sim=whole[1])

        # every input is validated from here on: the terms skip their own checks
        rows = AnchorRows(
            image_emb,
            text_emb,
            all_img,
            all_txt,
            offset,
            scores,
            None if self._cosine else self.similarity,
            (lambda x: dist_utils.all_gather_with_grad(x, sizes)) if gathered else None,
        )
        parts = row_terms(self, rows, image_ids, all_image_ids, rows_of_teacher, features, base_temperature)
        if gathered:
            self._install_gradient_sync()
            names = list(parts)
            exact = torch.stack([parts[k].detach() for k in names])
            torch.distributed.all_reduce(exact)  # the global terms (values, no gradient), one collective
            for k, value in zip(names, exact):
                scaled = world * parts[k]  # its gradient: exact once data parallelism averages over processes
                parts[k] = scaled + (value - scaled).detach()
        miner_teacher = rows_of_teacher.whole() if rows_of_teacher is not None and _uses_teacher(self.miner) else None
        parts.update(self._whole_batch_terms(rows, parts, all_image_ids, miner_teacher))
        total = (scores if scores is not None else image_emb).new_zeros((), dtype=torch.float32)
        for name, weight in self._weights().items():
            if name in parts:
                total = total + weight * parts[name]
        self._values_checked = True
        return {"loss": total, **parts}

    def _checked_inputs(self, image_emb, text_emb, scores, image_features, text_features, ids, image_ids, validate):
        """The module boundary: every input checked once (shapes and dtypes always, values when ``validate``), ids
        as tensors on the batch's device. Returns ``(image_emb, text_emb, scores, features or None, ids,
        image_ids)``."""
        have_emb = image_emb is not None and text_emb is not None
        if scores is None and not have_emb:
            raise ValueError("pass image_emb and text_emb ([B, D] each) or scores ([B, B] images x captions)")
        if have_emb:
            image_emb, text_emb = check_embeddings(image_emb, text_emb, same_dim=scores is None, validate=validate)
            if image_emb.shape[0] == 0:
                raise ValueError("the batch is empty (image_emb and text_emb have 0 rows)")
        else:
            image_emb = text_emb = None
        have_feat = image_features is not None or text_features is not None
        if have_feat:
            if image_features is None or text_features is None:
                raise ValueError("pass both image_features and text_features (the inputs of USA's uni-modal heads)")
            image_features, text_features = check_embeddings(
                image_features,
                text_features,
                same_dim=False,
                names=("image_features", "text_features"),
                validate=validate,
            )
        if (self.usa is not None or self.cmc is not None) and not (have_emb or (have_feat and self.cmc is None)):
            raise ValueError(
                "USA (beta > 0) and CMC (gamma > 0) need image_emb and text_emb (pooled embeddings) "
                "or, for USA, image_features / text_features, in addition to scores"
            )
        if scores is not None:
            scores = SF.check_square_pair(scores, "scores", validate=validate)
            if have_emb and image_emb.shape[0] != scores.shape[0]:
                n = scores.shape[0]
                raise ValueError(f"scores are [{n}, {n}] but the embeddings have {image_emb.shape[0]} rows")
        b = int(scores.shape[0] if scores is not None else image_emb.shape[0])
        device = (scores if scores is not None else image_emb).device
        if have_feat and image_features.shape[0] != b:
            raise ValueError(f"image_features have {image_features.shape[0]} rows but the batch has {b} pairs")
        if ids is not None:
            ids = _as_id_tensor(ids, "ids")
            if ids.shape != (b,):
                raise ValueError(f"ids must have shape [{b}] (one caption id per pair), got {tuple(ids.shape)}")
            ids = ids.to(device)
        if image_ids is not None:
            image_ids = torch.as_tensor(image_ids).to(device)
            if image_ids.shape != (b,):
                raise ValueError(f"image_ids must have shape [{b}], got {tuple(image_ids.shape)}")
        features = (image_features, text_features) if have_feat else None
        return image_emb, text_emb, scores, features, ids, image_ids

    def _whole_batch_terms(self, rows: AnchorRows, parts, image_ids, teacher) -> dict[str, torch.Tensor]:
        """The terms that need the whole ``[B, B]`` matrix: a custom base module, or a hinge with a miner (the base,
        or CMC's inter term). Computed alike on every process (the global value and gradient as they are)."""
        out: dict[str, torch.Tensor] = {}
        need_base = self.base is not None and "base" not in parts
        need_cmc = self.cmc is not None and "cmc" not in parts
        if not (need_base or need_cmc):
            return out
        scores = rows.whole()
        inputs = dict(
            scores=scores, image_ids=image_ids, teacher=None if teacher is None else TeacherSimilarities(*teacher)
        )
        if isinstance(self.base, VSEHingeLoss) and need_base:
            out["base"] = self.base(rows.all_image, rows.all_text, **inputs)  # miners may read the embeddings
        elif self.base is not None and need_base:
            out["base"] = self.base(scores=scores, image_ids=image_ids)  # a user's module: the documented call
        if self.cmc is not None and need_cmc:
            out["cmc"] = self.cmc(rows.all_image, rows.all_text, **inputs)
        return out


def _same_on_every_process(shares: dict[str, float], device) -> dict[str, float]:
    """Under multi-process training, the gradient norms averaged over the processes (one all-reduce at a
    diagnostic step), so that a :class:`~softalign.losses.soft_weight.TargetShare` moves every process's weights
    alike; the shares as they are on one process."""
    if not dist_utils.is_distributed():
        return shares
    import torch.distributed as dist

    keys = sorted(k for k in shares if k.startswith("norm_"))
    norms = torch.tensor([shares[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(norms)
    norms /= dist.get_world_size()
    from softalign.losses.diagnostics import shares_from_norms

    return shares_from_norms({k[len("norm_") :]: float(v) for k, v in zip(keys, norms.tolist())})


def _uses_teacher(miner) -> bool:
    if miner is None:
        return False
    if isinstance(miner, TeacherFilteredMiner):
        return True
    return _uses_teacher(getattr(miner, "inner", None))


def _teacher_rows(source, all_ids, b: int, sizes, offset: int, device, validate: bool):
    """The step's teacher, whatever form it came in, as :class:`TeacherRows` over the batch, and the image ids a
    cache look-up gives (``None`` otherwise): one look-up per step, the ids checked and mapped once."""
    if isinstance(source, TeacherSimilarities):
        rows = TeacherRows(
            SF.check_square_pair(source.image, "TeacherSimilarities.image", b, validate).to(device),
            SF.check_square_pair(source.text, "TeacherSimilarities.text", b, validate).to(device),
            matrices=True,
        )
        return rows, None
    if isinstance(source, TeacherEmbeddings):
        rows = TeacherRows(
            _teacher_embeddings(source.image, "TeacherEmbeddings.image", b, sizes, device, validate),
            _teacher_embeddings(source.text, "TeacherEmbeddings.text", b, sizes, device, validate),
            offset,
            b,
        )
        return rows, None
    if hasattr(source, "lookup"):
        if all_ids is None:
            raise ValueError("the soft-label terms need ids (global caption ids) to look up the teacher cache")
        image_ids, e_img, e_txt = source.lookup(all_ids, device=device)  # unit rows [B, D_i], [B, D_t]
        return TeacherRows(e_img, e_txt, offset, b), image_ids
    if source is None:
        raise ValueError(
            "the soft-label terms need a teacher: give the loss a cache and pass ids, or pass "
            "teacher=TeacherEmbeddings(image, text) ([B, D_t] each) or, on one process, "
            "teacher=TeacherSimilarities(image, text) ([B, B] each)"
        )
    raise TypeError(
        "teacher must be a cache (an object with lookup(ids, device), e.g. TeacherCache), "
        f"TeacherEmbeddings or TeacherSimilarities (softalign.teacher_inputs), got {type(source).__name__}"
    )


def _teacher_embeddings(e, name: str, rows: int, sizes, device, validate: bool) -> torch.Tensor:
    """A process's teacher embeddings, checked, gathered across processes (``sizes``) and L2-normalised."""
    e = SF.as_float(e.to(device), name, validate)
    if e.dim() != 2 or e.shape[0] != rows:
        raise ValueError(f"{name} must be [B, D_t] with B = {rows} (one row per pair), got {tuple(e.shape)}")
    if sizes is not None:
        e = dist_utils.gather_batch(e, sizes)
    return F.normalize(e, dim=1, eps=1e-8)
