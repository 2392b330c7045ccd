"""How the soft-label terms' weights move over training: ``alpha_t = alpha * s_t`` and ``beta_t = beta * s_t``.

:class:`~softalign.losses.SoftAlignLoss` multiplies CSA's and USA's weights by the scale ``s_t`` of its
``soft_weight`` object at every training step ``t`` (the loss's own step counter, saved with its state):

* ``None`` (default): ``s_t = 1``, CUSA's constant weights [Huang et al., AAAI 2024].
* :class:`DecayingWeight`: a linear warm-up over ``warmup_steps``, then a cosine (or linear) decay from 1 to
  ``final`` at ``total_steps``: the soft labels shape the early embedding and leave the end of training to the
  base loss.
* :class:`TargetShare`: ``s_t`` is steered so that CSA + USA carry a ``share`` of the loss gradient, measured by
  the loss's gradient-share diagnostic (:mod:`softalign.losses.diagnostics`) every ``every`` steps. With the soft
  terms' gradient norm ``a`` and the other terms' ``b`` measured at scale ``s``, the scale that gives share ``p``
  (norms proportional to the weight) is ``s* = s * p b / ((1 - p) a)``; the scale moves to
  ``s^(1 - m) s*^m`` (geometric smoothing with ``momentum`` m against batch noise), clamped to
  ``[min_scale, max_scale]``.

Every object has ``scale(step)``, ``observe(shares)``, a JSON ``state_dict`` (resume) and ``get_config_dict``
(:func:`soft_weight_from_config` rebuilds it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["DecayingWeight", "TargetShare", "soft_weight_from_config"]


class _SoftWeight:
    #: gradient-share diagnostics this object needs (every N training steps), or None
    every: int | None = None

    def scale(self, step: int) -> float:
        raise NotImplementedError

    def observe(self, shares: Mapping[str, float]) -> None:
        """Called with the loss's gradient shares (measured at the current scale) after each diagnostic."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def get_config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        cfg = self.get_config_dict()
        return f"{cfg.pop('name')}({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"


class DecayingWeight(_SoftWeight):
    """``s_t = t / warmup_steps`` during the warm-up, then from 1 down to ``final`` at ``total_steps`` along a
    half cosine (``kind="cosine"``) or a line (``kind="linear"``), and ``final`` after."""

    def __init__(self, total_steps: int, final: float = 0.0, warmup_steps: int = 0, kind: str = "cosine"):
        if int(total_steps) < 1:
            raise ValueError(f"DecayingWeight: total_steps must be >= 1 (the training steps), got {total_steps}")
        if not 0 <= int(warmup_steps) < int(total_steps):
            raise ValueError(
                f"DecayingWeight: warmup_steps must lie in [0, total_steps={total_steps}), got {warmup_steps}"
            )
        if not 0.0 <= float(final) <= 1.0:
            raise ValueError(f"DecayingWeight: final must lie in [0, 1] (a fraction of alpha / beta), got {final}")
        if kind not in ("cosine", "linear"):
            raise ValueError(f"DecayingWeight: kind must be 'cosine' or 'linear', got {kind!r}")
        self.total_steps, self.final, self.warmup_steps, self.kind = (
            int(total_steps),
            float(final),
            int(warmup_steps),
            kind,
        )

    def scale(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        x = min(1.0, (step - self.warmup_steps) / span)
        ramp = 0.5 * (1 + math.cos(math.pi * x)) if self.kind == "cosine" else 1.0 - x
        return self.final + (1.0 - self.final) * ramp

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "name": "DecayingWeight",
            "total_steps": self.total_steps,
            "final": self.final,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
        }


class TargetShare(_SoftWeight):
    """Steers the scale so that CSA + USA carry ``share`` of the gradient norm on the loss inputs."""

    def __init__(
        self,
        share: float = 0.5,
        every: int = 10,
        momentum: float = 0.5,
        min_scale: float = 0.01,
        max_scale: float = 100.0,
    ):
        if not 0.0 < float(share) < 1.0:
            raise ValueError(f"TargetShare: share must lie in (0, 1), got {share}")
        if int(every) < 1:
            raise ValueError(f"TargetShare: every must be >= 1 training step, got {every}")
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"TargetShare: momentum must lie in (0, 1], got {momentum}")
        if not 0.0 < float(min_scale) <= 1.0 <= float(max_scale):
            raise ValueError(f"TargetShare: need 0 < min_scale <= 1 <= max_scale, got {min_scale}, {max_scale}")
        self.share, self.every, self.momentum = float(share), int(every), float(momentum)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self._scale = 1.0

    def scale(self, step: int) -> float:
        return self._scale

    def observe(self, shares: Mapping[str, float]) -> None:
        soft = shares.get("norm_csa", 0.0) + shares.get("norm_usa", 0.0)
        rest = sum(v for k, v in shares.items() if k.startswith("norm_") and k not in ("norm_csa", "norm_usa"))
        if not (soft > 0 and rest > 0 and math.isfinite(soft) and math.isfinite(rest)):
            return  # nothing to steer by (a term switched off or without gradient on this batch)
        wanted = self._scale * self.share * rest / ((1.0 - self.share) * soft)
        moved = math.exp((1 - self.momentum) * math.log(self._scale) + self.momentum * math.log(wanted))
        self._scale = min(self.max_scale, max(self.min_scale, moved))

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self._scale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._scale = float(state.get("scale", 1.0))

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "name": "TargetShare",
            "share": self.share,
            "every": self.every,
            "momentum": self.momentum,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
        }


_KINDS = {"DecayingWeight": DecayingWeight, "TargetShare": TargetShare}


def soft_weight_from_config(config: Mapping[str, Any] | _SoftWeight | None) -> _SoftWeight | None:
    """The object of a :meth:`get_config_dict` record (``{"name": ..., options}``); objects and None pass through."""
    if config is None or isinstance(config, _SoftWeight):
        return config
    if not isinstance(config, Mapping) or config.get("name") not in _KINDS:
        raise ValueError(
            f"soft_weight: expected None, a DecayingWeight / TargetShare, or a config dict with "
            f"'name' in {sorted(_KINDS)}, got {config!r}"
        )
    options = {k: v for k, v in config.items() if k != "name"}
    try:
        return _KINDS[config["name"]](**options)
    except TypeError as err:
        raise ValueError(f"soft_weight {config['name']}: {err}") from None
