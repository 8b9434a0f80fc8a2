"""A fixed bijection that gives chosen circular coordinates a tabulated density.

:class:`TabulatedCircular` maps each chosen coordinate φ ∈ [−π, π) to t = 2π F(φ) − π, F the cumulative
distribution of a piecewise-constant density on K equal bins of the circle. A uniform density of t then
gives φ that density exactly, so a flow placed after this layer starts from it and learns departures from
it. The map is continuous on the circle (F(−π) = 0, F(π) = 1), piecewise linear, and its log-derivative is
log(2π p_k) in bin k (p_k: density per radian). ``bg.flows.transferable_nsf`` uses it to start rotatable
torsions from their force-field scans (``bg.coordinates.harmonic.torsion_scan``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bg.coordinates.geometry import wrap_angle


def boltzmann_table(energy: Tensor, temperature: float = 1.0, floor: float = 0.0) -> Tensor:
    """Bin probabilities ``(R, K)`` from energies ``(R, K)`` (kT, one row per coordinate): exp(−u/T), mixed with
    a uniform share ``floor`` so that no bin is empty."""
    if not 0.0 <= floor <= 1.0 or (floor == 0.0 and energy.numel() and not torch.isfinite(energy).all()):
        raise ValueError(f"floor must lie in [0, 1] (and be > 0 where energies are infinite), got {floor}")
    p = torch.softmax(-energy.double() / temperature, dim=-1)
    return (1.0 - floor) * p + floor / energy.shape[-1]


class TabulatedCircular(nn.Module):
    """z ``(B, D)`` → the same with the ``chosen`` ``(D,)`` coordinates (circular, rad) mapped through the CDF of
    their bin probabilities ``probabilities`` ``(R, K)`` (R = chosen.sum(), rows summing to 1, every bin > 0);
    the other coordinates unchanged. ``forward``/``inverse`` return ``(output, log|det|)`` ``(B,)``."""

    def __init__(self, chosen: Tensor, probabilities: Tensor):
        super().__init__()
        chosen = chosen.bool()
        if probabilities.ndim != 2 or probabilities.shape[0] != int(chosen.sum()):
            raise ValueError(f"expected probabilities of shape ({int(chosen.sum())}, K), got "
                             f"{tuple(probabilities.shape)}")
        if probabilities.numel() and (probabilities.min() <= 0 or not torch.allclose(
                probabilities.sum(-1), torch.ones_like(probabilities[:, 0]))):
            raise ValueError("every row of probabilities must be positive and sum to 1")
        self.register_buffer("chosen", chosen)
        p = probabilities.double()
        self.register_buffer("probability", p)
        cdf = torch.cat([p.new_zeros(len(p), 1), p.cumsum(-1)], -1)
        self.register_buffer("cdf", cdf / cdf[:, -1:].clamp(min=1e-300))
        self.bins = p.shape[-1]
        self.width = 2 * math.pi / self.bins

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if not self.probability.numel():
            return z, z.new_zeros(len(z))
        phi = wrap_angle(z[:, self.chosen]).T  # (R, B)
        k = torch.floor((phi + math.pi) / self.width).long().clamp(0, self.bins - 1)
        p, c = self.probability.to(z.dtype).gather(1, k), self.cdf.to(z.dtype).gather(1, k)
        f = c + (phi + math.pi - k.to(z.dtype) * self.width) * p / self.width
        out = z.clone()
        out[:, self.chosen] = (2 * math.pi * f - math.pi).T
        return out, torch.log(p * (2 * math.pi / self.width)).sum(0)

    def inverse(self, t: Tensor) -> tuple[Tensor, Tensor]:
        if not self.probability.numel():
            return t, t.new_zeros(len(t))
        f = ((t[:, self.chosen] + math.pi) / (2 * math.pi)).clamp(0.0, 1.0).T.contiguous()  # (R, B)
        cdf = self.cdf.to(t.dtype)
        k = (torch.searchsorted(cdf, f.detach(), right=True) - 1).clamp(0, self.bins - 1)
        p, c = self.probability.to(t.dtype).gather(1, k), cdf.gather(1, k)
        phi = -math.pi + k.to(t.dtype) * self.width + (f - c) * self.width / p
        out = t.clone()
        out[:, self.chosen] = wrap_angle(phi).T
        return out, -torch.log(p * (2 * math.pi / self.width)).sum(0)


__all__ = ["TabulatedCircular", "boltzmann_table"]
