"""Learnable, clamped temperatures (CUSA keeps its temperatures in a range by clamping before each step)."""

from __future__ import annotations

import torch
from torch import nn


class ClampedTemperature(nn.Module):
    """A positive scalar temperature, learnable or frozen, kept inside ``[low, high]``.

    Like CUSA's ``clamp_tau`` (and CLIP's logit-scale clamp) the stored value is clamped in place, without
    gradient, before each use, so an optimizer step that pushed it out of range is undone; the returned value
    is the parameter itself, so gradients reach it unchanged (also at a bound, from where it can move back).
    """

    def __init__(self, value: float, range: tuple[float, float] | None = None, learnable: bool = True):
        super().__init__()
        value = float(value)
        if not value > 0:
            raise ValueError(f"temperature must be > 0, got {value}")
        low, high = range if range is not None else (value, value) if not learnable else (1e-4, 1e4)
        if not 0 < low <= high:
            raise ValueError(f"temperature range must satisfy 0 < low <= high, got {(low, high)}")
        if not low <= value <= high:
            raise ValueError(f"temperature {value} lies outside its range [{low}, {high}]")
        self.low, self.high, self.learnable = float(low), float(high), bool(learnable)
        tensor = torch.tensor(value, dtype=torch.float32)
        if learnable:
            self.value = nn.Parameter(tensor)
        else:
            self.register_buffer("value", tensor)

    def forward(self) -> torch.Tensor:
        if self.learnable:
            if _functorch_active():
                # torch.func transforms forbid mutating a captured tensor: the same value, clamped out of place, with
                # the gradient passed through unchanged (as the in-place clamp leaves it)
                v = self.value.float()
                return v + (v.clamp(self.low, self.high) - v).detach()
            # In place on .data: no device sync, no autograd version bump (a graph built earlier in the
            # same step stays valid); a no-op while the value is inside its range.
            self.value.data.clamp_(self.low, self.high)
        return self.value.float()

    def set_frozen_value(self, value: float) -> None:
        """Set a frozen temperature (e.g. a calibrated soft-label temperature); learnable ones refuse."""
        value = float(value)
        if self.learnable:
            raise ValueError("set_frozen_value is for frozen temperatures; a learnable one is set by its optimizer")
        if not value > 0 or value == float("inf"):
            raise ValueError(f"temperature must be finite and > 0, got {value}")
        self.low = self.high = value
        self.value.fill_(value)

    def extra_repr(self) -> str:
        return f"value={float(self.value.detach()):.4g}, range=[{self.low}, {self.high}], learnable={self.learnable}"


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if callable(active) else False
