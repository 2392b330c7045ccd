"""Term balance: each loss term's share of the gradient on the loss inputs.

A soft-label term only changes training when it moves the embeddings. Its weight alone does not say whether it
does: VSE++'s hinge sums over anchors while CUSA's KL terms are batch means, InfoNCE's gradient scales with
``1 / temperature``, and near-uniform soft labels have near-zero gradients. The diagnostic measures it directly:

    ``share_k = ||d (w_k L_k) / d x|| / sum_j ||d (w_j L_j) / d x||``

with ``x`` every loss input that requires grad (joint embeddings, uni-modal features, precomputed scores), the
norm over all of them together. :class:`~softalign.losses.SoftAlignLoss` computes it every ``diagnostics_every``
training steps (``loss.gradient_shares``) and warns once when CSA + USA carry less than
``LOW_SHARE`` of it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch

#: Below this combined share of CSA + USA a one-time warning says the soft labels hardly act.
LOW_SHARE = 0.01

__all__ = [
    "LOW_SHARE",
    "gradient_norms",
    "gradient_shares",
    "shares_from_norms",
    "warn_if_soft_terms_silent",
    "SoftTermsSilentWarning",
]


class SoftTermsSilentWarning(UserWarning):
    """CSA + USA carry under 1% of the loss gradient: the soft labels barely change training."""


def gradient_norms(terms: Mapping[str, torch.Tensor], inputs: Sequence[torch.Tensor]) -> dict[str, float]:
    """``{name: ||d term / d inputs||_2}`` (the norm over all inputs together); the graph is kept."""
    inputs = [x for x in inputs if x.requires_grad]
    out: dict[str, float] = {}
    for name, term in terms.items():
        if not term.requires_grad:
            out[name] = 0.0
            continue
        grads = torch.autograd.grad(term, inputs, retain_graph=True, allow_unused=True)
        sq = sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None)
        out[name] = math.sqrt(sq)
    return out


def gradient_shares(terms: Mapping[str, torch.Tensor], inputs: Sequence[torch.Tensor]) -> dict[str, float]:
    """Each (weighted) term's share of the summed gradient norms, plus ``"soft"`` = CSA + USA and the norms
    themselves as ``"norm_<name>"``. Shares are 0 when no term has a gradient."""
    return shares_from_norms(gradient_norms(terms, inputs))


def shares_from_norms(norms: Mapping[str, float]) -> dict[str, float]:
    """``{name: norm / sum of norms}``, ``"soft"`` = CSA + USA, and the norms as ``"norm_<name>"``."""
    total = sum(norms.values())
    shares = {k: (v / total if total > 0 else 0.0) for k, v in norms.items()}
    shares["soft"] = shares.get("csa", 0.0) + shares.get("usa", 0.0)
    shares.update({f"norm_{k}": v for k, v in norms.items()})
    return shares


def warn_if_soft_terms_silent(shares: Mapping[str, float], config: str = "") -> bool:
    """Warn (once per caller) when the soft-label terms are on but carry under :data:`LOW_SHARE` of the gradient.
    Returns True when it warned."""
    if not any(k in shares for k in ("csa", "usa")):
        return False
    if shares["soft"] >= LOW_SHARE:
        return False
    detail = ", ".join(f"{k} {100 * v:.3g}%" for k, v in shares.items() if not k.startswith("norm_") and k != "soft")
    warnings.warn(
        f"softalign: the soft-label terms (CSA + USA) carry {100 * shares['soft']:.3g}% of the loss gradient "
        f"({detail}; {config}). They barely change training: raise alpha / beta, lower teacher_temperature "
        "(or use teacher_temperature='auto'), or check the base loss's scale (a hinge sums over anchors).",
        SoftTermsSilentWarning,
        stacklevel=4,
    )
    return True
