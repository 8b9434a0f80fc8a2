"""Training regularisers for huge energies, kept apart from the physical energy."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def linlog_cut(u: Tensor, high: float = 1e3, max_value: float = 1e9) -> Tensor:
    """Linear below ``high``, logarithmic above it, clamped at ``max_value`` (all in kT).

    u' = u for u ≤ high;  u' = high + log(1 + u − high) above. Keeps gradients of samples with
    clashing atoms bounded while preserving the ordering of energies. +inf becomes ``max_value``;
    NaN stays NaN (filter those samples out and count them, never average them).
    """
    if high >= max_value:
        raise ValueError(f"linlog_cut needs high < max_value, got {high} ≥ {max_value}")
    excess = torch.clamp(u - high, min=0.0)
    cut = torch.where(u > high, high + torch.log1p(excess), u)
    return torch.clamp(cut, max=max_value)


class RegularizedEnergy(nn.Module):
    """Wrap a target energy ``u(x)`` (kT) with :func:`linlog_cut` for use in training losses."""

    def __init__(self, energy: nn.Module, high: float = 1e3, max_value: float = 1e9):
        super().__init__()
        self.energy = energy
        self.high = high
        self.max_value = max_value

    def forward(self, x: Tensor) -> Tensor:
        return linlog_cut(self.energy(x), self.high, self.max_value)
