"""Rational-quadratic spline transforms (Durkan et al. 2019), bounded and circular.

Elementwise monotonic bijections of an interval, parametrised by unnormalised bin widths, bin
heights and knot derivatives (what a conditioner network outputs):

- bounded: [low, high] → [low, high], K bins, K + 1 free knot derivatives; for bond lengths and
  angles scaled into a fixed interval. Inputs outside the interval are an error of the caller
  (they are clamped, and counted by ``out_of_bounds``).
- circular: [−π, π) → [−π, π), K bins, K free derivatives, the derivative at +π equal to the one at
  −π, so the transformed density is continuous across ±π (for torsions, Rezende et al. 2020).

Both return ``(y, log|dy/dx|)`` elementwise, forward or inverse, in the input's dtype. Written here
because the circular variant with free periodic end-derivatives is not in the maintained flow
libraries (zuko's monotonic RQ spline fixes the end derivatives to 1).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _knots(unnormalized: Tensor, low: float, high: float, min_size: float) -> tuple[Tensor, Tensor]:
    """Bin sizes and knot positions ``(..., K + 1)`` spanning [low, high] exactly."""
    k = unnormalized.shape[-1]
    sizes = min_size + (1 - min_size * k) * torch.softmax(unnormalized, dim=-1)
    knots = torch.cumsum(sizes, dim=-1)
    knots = F.pad(knots, (1, 0), value=0.0)
    knots = low + (high - low) * knots
    knots[..., 0], knots[..., -1] = low, high  # exact end points despite rounding in the cumsum
    return knots[..., 1:] - knots[..., :-1], knots


def _search(knots: Tensor, x: Tensor) -> Tensor:
    """Index of the bin of each x (bins are [knot_k, knot_k+1))."""
    idx = torch.searchsorted(knots[..., 1:-1].contiguous(), x[..., None].contiguous(), right=True)
    return idx.squeeze(-1)


def rq_spline(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    low: float = -1.0,
    high: float = 1.0,
    inverse: bool = False,
    circular: bool = False,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Apply a rational-quadratic spline elementwise.

    Args:
        x: ``(...)`` values in [low, high] (for ``circular``, [low, high) with high − low the period).
        widths, heights: ``(..., K)`` unnormalised bin widths and heights.
        derivatives: ``(..., K + 1)`` unnormalised knot derivatives, or ``(..., K)`` if ``circular``
            (the last knot reuses the first one's derivative).
        inverse: apply the inverse map.
    Returns:
        ``(y, log|dy/dx|)`` with the shape of ``x``; for ``inverse`` the log-det is that of the
        inverse map (the negative of the forward one at the output).
    """
    k = widths.shape[-1]
    if heights.shape[-1] != k:
        raise ValueError(f"widths and heights need the same number of bins, got {k} and {heights.shape[-1]}")
    n_deriv = k if circular else k + 1
    if derivatives.shape[-1] != n_deriv:
        raise ValueError(f"{'circular' if circular else 'bounded'} spline with {k} bins needs {n_deriv} derivatives, "
                         f"got {derivatives.shape[-1]}")
    if circular:
        derivatives = torch.cat([derivatives, derivatives[..., :1]], dim=-1)
    # Offset so that zero parameters give derivative 1 (with uniform bins: the identity map).
    d = min_derivative + F.softplus(derivatives + math.log(math.expm1(1 - min_derivative)))
    w, xk = _knots(widths, low, high, min_bin_width)
    h, yk = _knots(heights, low, high, min_bin_height)
    x = x.clamp(low, high)
    idx = _search(yk if inverse else xk, x)[..., None]
    w_k, h_k = w.gather(-1, idx)[..., 0], h.gather(-1, idx)[..., 0]
    x_k, y_k = xk.gather(-1, idx)[..., 0], yk.gather(-1, idx)[..., 0]
    d_k, d_k1 = d.gather(-1, idx)[..., 0], d.gather(-1, idx + 1)[..., 0]
    s = h_k / w_k
    delta = d_k + d_k1 - 2 * s
    if not inverse:
        xi = (x - x_k) / w_k
        om = xi * (1 - xi)
        denom = s + delta * om
        y = y_k + h_k * (s * xi * xi + d_k * om) / denom
        deriv = s * s * (d_k1 * xi * xi + 2 * s * om + d_k * (1 - xi) ** 2) / (denom * denom)
        return y, torch.log(deriv)
    dy = x - y_k
    a = h_k * (s - d_k) + dy * delta
    b = h_k * d_k - dy * delta
    c = -s * dy
    disc = (b * b - 4 * a * c).clamp(min=0.0)
    xi = (2 * c) / (-b - torch.sqrt(disc))
    y = x_k + xi * w_k
    om = xi * (1 - xi)
    denom = s + delta * om
    deriv = s * s * (d_k1 * xi * xi + 2 * s * om + d_k * (1 - xi) ** 2) / (denom * denom)
    return y, -torch.log(deriv)


@functools.cache
def compiled_rq_spline() -> Callable[..., tuple[Tensor, Tensor]]:
    """:func:`rq_spline` through ``torch.compile`` (dynamic shapes: one graph per direction, dtype and grad mode,
    shared by every coupling; the first calls compile, ~10–30 s on CPU, which needs a C++ compiler). It fuses
    the spline's few dozen elementwise operations; the results equal :func:`rq_spline`'s to rounding.

    Raises ``RuntimeError`` naming the fix when torch finds no C++ compiler (torch's own error would surface at
    the first compiled call, deep inside Inductor)."""
    require_cpp_compiler("compile_splines: true")
    return torch.compile(rq_spline, dynamic=True)


def require_cpp_compiler(option: str) -> None:
    """Raise ``RuntimeError`` if ``torch.compile`` would find no C++ compiler (``CXX`` or Inductor's search list);
    ``option`` names the setting that asked for compilation."""
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.cpp_builder import cpp_compiler_search
    except ImportError:  # a torch without these internals: let torch.compile speak for itself
        return
    cxx = inductor_config.cpp.cxx
    search = tuple(cxx) if isinstance(cxx, (list, tuple)) else (cxx,)
    try:
        cpp_compiler_search(search)
    except Exception as error:
        names = ", ".join(str(c) for c in search if c is not None)
        raise RuntimeError(
            f"{option} needs a C++ compiler for torch.compile, and none was found (tried: {names}). Install one "
            "(e.g. `apt install g++`, or point torch at one with the CXX environment variable) or set the option "
            "to false; checkpoints sample without a compiler either way.") from error


def circular_rq_spline(x: Tensor, widths: Tensor, heights: Tensor, derivatives: Tensor, inverse: bool = False,
                       **kwargs) -> tuple[Tensor, Tensor]:
    """:func:`rq_spline` on the circle [−π, π) (torsions), with periodic knot derivatives."""
    y, ld = rq_spline(x, widths, heights, derivatives, low=-math.pi, high=math.pi, inverse=inverse, circular=True,
                      **kwargs)
    # π maps to π; keep the [−π, π) convention of torsions.
    return torch.where(y >= math.pi, y - 2 * math.pi, y), ld


def out_of_bounds(x: Tensor, low: float, high: float) -> int:
    """How many inputs lie outside [low, high] (they would be clamped by :func:`rq_spline`)."""
    return int(((x < low) | (x > high)).sum())
