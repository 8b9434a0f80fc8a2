"""Centre-of-mass (CoM) handling for flows that model all 3N Cartesian coordinates (TarFlow).

A molecule's energy does not depend on where it is, so its Boltzmann density lives on the
3(N−1)-dimensional subspace of centred frames y. A flow over all 3N numbers (SBG's TarFlow) is
trained on centred frames plus a random CoM shift c ~ N(0, σ² I₃) on every atom, so it learns the
extended density p(y)·N(c; 0, σ²) on R^{3N} = (centred subspace) × (CoM). At inference a flow sample
x = y + c comes with log q(x) over all 3N coordinates, and the question is what to use as the
density of its shape y.

The answer used here is importance sampling on the extended space. Take the extended target
π(y, c) = p(y)·h(c) for any integrable h ≥ 0: its y-marginal is p(y) whatever h is, so the weights

    w(x) = p(y)·h(c) / q(x)        (x = y + c, both in the flow's units)

are valid self-normalised importance weights for p(y), exactly. ``h`` only changes their variance,
which is smallest when h(c) is close to the flow's own CoM density given y. That gives the choices
(``kind``):

- ``"gaussian"`` (default): h = the training noise N(c; 0, σ² I₃), which the flow was fitted to.
  Normalised as a density of the orthonormal CoM coordinate √N·c, so ``log q(x) − log h(c)`` is
  exactly the log density of y on the subspace when the flow factorises as q(y)·N(c) (tested on
  a Gaussian). Recommended.
- ``"chi3"``: h = the χ₃ density of the CoM radius r = |c| with scale σ, used as a function of c,
  the convention of the public SBG code (Tan et al. 2025, Prop. 1). It is integrable, so the
  weights stay consistent, but it is the Gaussian times 4π·N^{3/2}·r²: it down-weights the samples
  with a CoM near 0, which a flow fitted to Gaussian CoM noise proposes most often, so the weights
  vary more unless the flow's CoM marginal is itself shell-shaped. Kept for comparison with SBG.
- ``"none"``: h = 1, i.e. log q(x) taken as the density of y. Not integrable in c; the weights then
  carry the flow's CoM density as extra noise (only a constant when the flow's CoM is independent of
  y and exactly Gaussian, which it never is once trained). For ablations.

Units: ``c`` and ``sigma`` in the flow's units (nm / the global scale).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

ComCorrection = Literal["gaussian", "chi3", "none"]
COM_CORRECTIONS: tuple[str, ...] = get_args(ComCorrection)


def centre_of_mass(x: Tensor) -> Tensor:
    """Unweighted centre ``(B, 3)`` of frames ``(B, N, 3)`` (the centroid; TarFlow treats atoms alike)."""
    return x.mean(dim=1)


def centred(x: Tensor) -> Tensor:
    """Frames ``(B, N, 3)`` moved so that their centroid is at the origin."""
    return x - centre_of_mass(x)[:, None]


def com_log_density(x: Tensor, sigma: float, kind: ComCorrection = "gaussian") -> Tensor:
    """log h(c) ``(B,)`` of the CoM c of frames x ``(B, N, 3)`` (see module docstring).

    ``"gaussian"``: log N(√N·c; 0, N σ² I₃) (density of the orthonormal CoM coordinate).
    ``"chi3"``: log of the χ₃ radial density √(2/π)·r²/σ³·exp(−r²/2σ²), r = |c|.
    ``"none"``: 0.
    """
    if kind not in COM_CORRECTIONS:
        raise ValueError(f"com_correction must be one of {', '.join(COM_CORRECTIONS)}, got {kind!r}")
    if sigma <= 0:
        raise ValueError(f"the CoM noise sigma must be positive, got {sigma}")
    if kind == "none":
        return x.new_zeros(x.shape[0])
    n = x.shape[1]
    r2 = centre_of_mass(x).square().sum(-1)
    if kind == "gaussian":
        var = n * sigma**2  # of √N·c
        return -0.5 * n * r2 / var - 1.5 * math.log(2 * math.pi * var)
    return 0.5 * math.log(2 / math.pi) + torch.log(r2) - 3 * math.log(sigma) - r2 / (2 * sigma**2)


def add_com_noise(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Frames ``(B, N, 3)`` shifted as a whole by c ~ N(0, σ² I₃) each."""
    c = torch.randn(x.shape[0], 1, 3, generator=generator, dtype=torch.float64).to(x)
    return x + sigma * c
