"""Base distributions over internal coordinates: independent per coordinate.

Bounded coordinates (bonds, angles) live on their spline interval [low, high]; torsions on the
circle [−π, π). Choices (``bounded=``, ``torsion=``):

- bounded ``"uniform"``: uniform on [low, high];
- bounded ``"truncated_normal"``: normal with the data mean and standard deviation, truncated to
  [low, high] (the flow starts near the data, which speeds up the first epochs);
- torsion ``"uniform"``: uniform on the circle;
- torsion ``"von_mises"``: von Mises with the data's circular mean and a concentration from the
  data's mean resultant length (Banerjee et al. 2005 approximation, clipped to
  ``max_concentration``); multimodal torsions get a small concentration, i.e. nearly uniform.
  Kim et al. (2024) found a von Mises base helped protein G.

Statistics are buffers set by :meth:`CoordinateBase.fit` and saved with the model.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from bg.choices import check_choices

BoundedBase = Literal["uniform", "truncated_normal"]
TorsionBase = Literal["uniform", "von_mises"]


def _std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


class CoordinateBase(nn.Module):
    """Product base distribution, ``log_prob(u)`` ``(B, D)`` → ``(B,)`` and ``sample(n)`` ``(n, D)``.

    Args:
        circular: ``(D,)`` True for torsions.
        low, high: ``(D,)`` intervals of the bounded coordinates (ignored for torsions).
        bounded, torsion: family names (see module docstring).
        max_concentration: upper clip of the von Mises concentration.
    """

    def __init__(self, circular: Tensor, low: Tensor, high: Tensor, bounded: BoundedBase = "truncated_normal",
                 torsion: TorsionBase = "uniform", max_concentration: float = 20.0):
        super().__init__()
        check_choices(CoordinateBase.__init__, dict(bounded=bounded, torsion=torsion), "base: ")
        self.bounded, self.torsion = bounded, torsion
        self.max_concentration = max_concentration
        self.register_buffer("circular", circular.bool())
        self.register_buffer("low", low.double())
        self.register_buffer("high", high.double())
        # Defaults (before fit): centred normal of a quarter of the interval, near-uniform von Mises.
        self.register_buffer("loc", torch.where(self.circular, 0.0, (self.low + self.high) / 2))
        self.register_buffer("scale", torch.where(self.circular, 1e-3, (self.high - self.low) / 4))

    @torch.no_grad()
    def fit(self, z: Tensor) -> "CoordinateBase":
        """Set the means/spreads from data ``z`` ``(F, D)`` (bounded: mean, std; torsions: circular
        mean, von Mises concentration)."""
        z = z.double()
        c = self.circular
        mean = z.mean(0)
        std = z.std(0).clamp(min=1e-4 * (self.high - self.low))
        cm = torch.atan2(torch.sin(z).mean(0), torch.cos(z).mean(0))
        r = torch.sqrt(torch.sin(z).mean(0) ** 2 + torch.cos(z).mean(0) ** 2).clamp(max=1 - 1e-6)
        kappa = (r * (2 - r * r) / (1 - r * r)).clamp(min=1e-3, max=self.max_concentration)
        self.loc.copy_(torch.where(c, cm, mean))
        self.scale.copy_(torch.where(c, kappa, std))
        return self

    def _bounded_terms(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        b = ~self.circular
        low, high = self.low[b].to(dtype), self.high[b].to(dtype)
        loc, scale = self.loc[b].to(dtype), self.scale[b].to(dtype)
        return b, low, high, loc, scale

    def log_prob(self, u: Tensor) -> Tensor:
        out = torch.zeros_like(u)
        b, low, high, loc, scale = self._bounded_terms(u.dtype)
        if b.any():
            if self.bounded == "uniform":
                out[:, b] = -torch.log(high - low).expand_as(u[:, b])
            else:
                mass = _std_normal_cdf((high - loc) / scale) - _std_normal_cdf((low - loc) / scale)
                t = (u[:, b] - loc) / scale
                out[:, b] = -0.5 * t * t - 0.5 * math.log(2 * math.pi) - torch.log(scale) - torch.log(mass)
        c = self.circular
        if c.any():
            if self.torsion == "uniform":
                out[:, c] = -math.log(2 * math.pi)
            else:
                kappa, mu = self.scale[c].to(u.dtype), self.loc[c].to(u.dtype)
                # log I0(κ) = log i0e(κ) + κ, stable for large κ.
                out[:, c] = kappa * (torch.cos(u[:, c] - mu) - 1) - math.log(2 * math.pi) - torch.log(
                    torch.special.i0e(kappa))
        return out.sum(-1)

    @torch.no_grad()
    def sample(self, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
        d = len(self.circular)
        dev = self.low.device
        out = torch.empty(n, d, dtype=torch.float64, device=dev)
        b, low, high, loc, scale = self._bounded_terms(torch.float64)
        if b.any():
            r = torch.rand(n, int(b.sum()), dtype=torch.float64, device=dev)
            if self.bounded == "uniform":
                out[:, b] = low + r * (high - low)
            else:
                a, c_ = _std_normal_cdf((low - loc) / scale), _std_normal_cdf((high - loc) / scale)
                p = (a + r * (c_ - a)).clamp(1e-15, 1 - 1e-15)
                out[:, b] = (loc + scale * torch.special.ndtri(p)).clamp(low, high)
        c = self.circular
        if c.any():
            if self.torsion == "uniform":
                out[:, c] = (torch.rand(n, int(c.sum()), dtype=torch.float64, device=dev) * 2 - 1) * math.pi
            else:
                vm = torch.distributions.VonMises(self.loc[c], self.scale[c])
                out[:, c] = torch.remainder(vm.sample((n,)) + math.pi, 2 * math.pi) - math.pi
        return out.to(dtype)
