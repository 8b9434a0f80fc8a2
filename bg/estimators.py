"""Estimates with error bars, from importance-weighted samples and from correlated MD frames.

Every estimate here is a smooth function ``h`` of weighted means of per-sample features ``F`` ``(n, k)``
(state indicators, histogram-bin indicators, observable values): a population is the mean of an
indicator, a free-energy difference ``−ln(p_a / p_b)``, a free-energy surface ``−ln p_bin`` up to a
constant. Two kinds of sample set, two kinds of error bar:

- **Weighted samples** (a generator's proposals with log importance weights, independent draws):
  self-normalised estimates, error bars by the bootstrap over samples (pairs (F_i, w_i) resampled with
  replacement, the normalised estimate recomputed), 95 % percentile intervals. Flagged unreliable when the
  Kish ESS is below ``min_ess`` samples: the bootstrap then misses the weight that has not been drawn yet.
- **Correlated frames** (MD, equal weights): the delta method on the linearised series
  ψ_t = ∇h · (F_t − F̄) (torch autograd supplies ∇h) with the statistical inefficiency g of ψ
  (``pymbar.timeseries``): σ² = g · Var ψ / n. Frames are not independent; an i.i.d. bootstrap would
  understate the error by √g.

Energies in kT; :data:`KCAL_PER_MOL_PER_K` converts a free energy at temperature T to kcal/mol.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from bg.quiet import quietly
from bg.sampling.ess import finite_log_weights, kish_ess, log_sum_weights

#: the gas constant in kcal/(mol K): ΔF[kcal/mol] = ΔF[kT] · R · T
KCAL_PER_MOL_PER_K = 0.0019872042586408316
#: two-sided 95 % normal quantile
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """A value with its standard error and a 95 % interval ``[low, high]``; ``reliable`` is False when the
    error bar is not to be trusted (too few effective samples; ``note`` says why)."""

    value: float
    error: float
    low: float
    high: float
    reliable: bool = True
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self, digits: int = 3) -> str:
        """``value ± error`` in ``digits`` significant figures of the error (``!`` when unreliable)."""
        flag = "" if self.reliable else " (!)"
        value = self.value + 0.0  # −0.0 (e.g. −ln 1) reads 0
        if not math.isfinite(value):
            return f"{value}{flag}"
        if not math.isfinite(self.error) or self.error == 0:
            return f"{value:.{digits}g}{flag}"
        decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(self.error)))))
        return f"{value:.{decimals}f} ± {self.error:.{decimals}f}{flag}"


def statistical_inefficiency(series: np.ndarray | Tensor) -> float:
    """g = 1 + 2τ of a time series ``(n,)`` (``pymbar.timeseries``); 1.0 for a constant or short series."""
    series = np.asarray(series.detach().cpu() if isinstance(series, Tensor) else series, dtype=float)
    if len(series) < 3 or np.ptp(series) == 0:
        return 1.0
    with quietly():
        from pymbar import timeseries

        return float(timeseries.statistical_inefficiency(series))




def weighted_means(features: Tensor, log_w: Tensor | None = None) -> Tensor:
    """Self-normalised weighted means ``(k,)`` of ``features`` ``(n, k)``; equal weights without ``log_w``."""
    f = features.double()
    if log_w is None:
        return f.mean(0)
    lw = finite_log_weights(log_w)
    w = torch.exp(lw - lw.max())
    return (w[:, None] * f).sum(0) / w.sum()


def label_means(labels: Tensor, k: int, log_w: Tensor | None = None) -> Tensor:
    """Weighted fraction ``(k,)`` of samples with each label ``0 … k − 1`` (−1: none) of ``labels`` ``(n,)``."""
    labels = labels.long().flatten()
    inside = labels >= 0
    if log_w is not None and k <= 64:
        # the training-time metric's reduction (bg.metrics.WeightedFraction calls it too): equal values
        total = log_sum_weights(log_w)
        return torch.stack([torch.exp(log_sum_weights(log_w, labels == j) - total) for j in range(k)])
    if log_w is None:
        w = torch.ones(len(labels), dtype=torch.float64)
    else:
        lw = finite_log_weights(log_w)
        w = torch.exp(lw - lw.max())
    return torch.zeros(k, dtype=torch.float64).index_add_(0, labels[inside], w[inside]) / w.sum()


class SampleSet:
    """Per-sample features of one sample set and how its error bars are computed.

    Args:
        log_w: ``(n,)`` log importance weights of independent samples (a generator's proposals), or None
            for equally weighted, time-ordered frames (MD; several trajectories: pass ``lengths``).
        lengths: MD only, the number of frames of each trajectory (in order; default one trajectory).
        n_boot: bootstrap replicates (weighted samples).
        min_ess: weighted samples with a Kish ESS below this many samples are flagged unreliable.
        seed: the bootstrap's random stream (estimates are reproducible).
    """

    def __init__(self, log_w: Tensor | None = None, n: int | None = None, lengths: list[int] | None = None,
                 n_boot: int = 1000, min_ess: float = 100.0, seed: int = 0):
        if log_w is None and n is None:
            raise ValueError("a sample set needs log weights or, for MD frames, their number n")
        self.log_w = None if log_w is None else finite_log_weights(log_w)
        self.n = len(self.log_w) if self.log_w is not None else int(n)
        self.lengths = list(lengths) if lengths is not None else [self.n]
        if sum(self.lengths) != self.n:
            raise ValueError(f"trajectory lengths {self.lengths} do not add up to {self.n} frames")
        self.n_boot, self.min_ess, self.seed = n_boot, min_ess, seed

    @property
    def weighted(self) -> bool:
        return self.log_w is not None

    def ess(self) -> float:
        """Kish ESS in samples (the frame count for MD; see :func:`effective_frames` for their worth)."""
        return float(kish_ess(self.log_w)) * self.n if self.weighted else float(self.n)

    def _replicate_means(self, f: Tensor | None, labels: Tensor | None, k: int, chunk: int = 64) -> Tensor:
        """``(n_boot, k)`` weighted means of each bootstrap replicate: of the columns of ``f`` ``(n, k)``, or of
        the indicators of ``labels`` ``(n,)`` in ``0 … k − 1`` (−1: none). The same replicates for every call."""
        gen = torch.Generator().manual_seed(self.seed)
        w = torch.exp(self.log_w - self.log_w.max())
        out = []
        for start in range(0, self.n_boot, chunk):
            b = min(chunk, self.n_boot - start)
            idx = torch.randint(self.n, (b, self.n), generator=gen)
            rw = torch.zeros(b, self.n, dtype=torch.float64).scatter_add_(1, idx, w[idx])  # counts × w
            if labels is None:
                sums = rw @ f
            else:
                inside = labels >= 0
                sums = torch.zeros(b, k, dtype=torch.float64).index_add_(1, labels[inside], rw[:, inside])
            out.append(sums / rw.sum(1, keepdim=True))
        return torch.cat(out)

    def estimate(self, features: Tensor | None = None, h: Callable[[Tensor], Tensor] | None = None, *,
                 labels: Tensor | None = None, n_labels: int | None = None) -> list[Estimate]:
        """Estimates of ``h(means)`` (default: the means themselves) of ``features`` ``(n, k)``, or of the
        indicators of ``labels`` ``(n,)`` (values ``0 … n_labels − 1``; −1: none) — the same thing, faster for
        many states or bins. ``h`` maps the ``(k,)`` weighted means to ``(m,)`` quantities, written in torch
        (it is differentiated for MD error bars)."""
        h = h or (lambda m: m)
        if labels is not None:
            labels = labels.long().flatten()
            k = int(labels.max()) + 1 if n_labels is None else n_labels
            f, means = None, label_means(labels, k, self.log_w)
        else:
            f = features.double().reshape(self.n, -1)
            k, means = f.shape[1], weighted_means(f, self.log_w)
        value = h(means)
        if not self.weighted:
            return self._delta_method(f, labels, means, h, value)
        boot = self._replicate_means(f, labels, k)
        boot = torch.stack([h(m) for m in boot])  # (n_boot, m)
        ok = torch.isfinite(boot)
        ess = self.ess()
        reliable = ess >= self.min_ess
        note = "" if reliable else f"ESS {ess:.0f} < {self.min_ess:g} samples: the error bar is not trustworthy"
        out = []
        for j, v in enumerate(value.tolist()):
            b = boot[ok[:, j], j]
            if len(b) < 0.9 * self.n_boot:  # undefined in > 10 % of replicates (an empty state)
                out.append(Estimate(float(v), math.inf, -math.inf, math.inf, False, "undefined in most replicates"))
                continue
            out.append(Estimate(float(v), float(b.std()), float(torch.quantile(b, 0.025)),
                                float(torch.quantile(b, 0.975)), reliable, note))
        return out

    def _delta_method(self, f: Tensor | None, labels: Tensor | None, means: Tensor, h: Callable[[Tensor], Tensor],
                      value: Tensor) -> list[Estimate]:
        out = []
        jac = torch.autograd.functional.jacobian(h, means).reshape(len(value), -1)  # (m, k)
        for j, v in enumerate(value.tolist()):
            if not math.isfinite(v) or not torch.isfinite(jac[j]).all():
                out.append(Estimate(float(v), math.inf, -math.inf, math.inf, False, "undefined (an empty state?)"))
                continue
            # the linearised series ψ_t = ∇h · (F_t − F̄), (n,)
            if labels is None:
                psi = (f - means) @ jac[j]
            else:
                psi = torch.where(labels >= 0, jac[j][labels.clamp(min=0)], 0.0) - means @ jac[j]
            var, dof = 0.0, 0.0
            start = 0
            for length in self.lengths:  # each trajectory its own g; the variance of the mean adds up
                seg = psi[start:start + length]
                start += length
                if length < 2:
                    continue
                g = statistical_inefficiency(seg)
                var += g * float((seg**2).sum())
                dof += length / g
            err = math.sqrt(var) / self.n
            reliable = dof >= 20
            note = "" if reliable else f"only {dof:.0f} independent frames: the MD error bar is rough"
            out.append(Estimate(v, err, v - Z95 * err, v + Z95 * err, reliable, note))
        return out


def populations(states: Tensor, n_states: int, sample_set: SampleSet) -> list[Estimate]:
    """Population of each state ``0 … n_states − 1`` of per-sample state labels ``states`` ``(n,)`` (−1: none)."""
    return sample_set.estimate(labels=states, n_labels=n_states)


def free_energy_differences(states: Tensor, n_states: int, sample_set: SampleSet, reference: int = 0) -> list[Estimate]:
    """ΔF_s = F_s − F_reference = −ln(p_s / p_reference) in kT for every state s (0 for the reference itself)."""
    return sample_set.estimate(h=lambda p: -torch.log(p / p[reference]), labels=states, n_labels=n_states)


def free_energy_surface(bins: Tensor, n_bins: int, sample_set: SampleSet) -> tuple[list[Estimate], int]:
    """F per bin = −ln(p_bin / p_lowest) in kT (the most populated bin at 0) of per-sample bin indices
    ``bins`` ``(n,)`` (−1: outside every bin), with per-bin errors; returns the estimates and the index of
    the lowest bin. Empty bins read +inf with no error bar."""
    lowest = int(torch.argmax(label_means(bins, n_bins, sample_set.log_w)))
    return sample_set.estimate(h=lambda q: -torch.log(q / q[lowest]), labels=bins, n_labels=n_bins), lowest


def effective_frames(series: Tensor, lengths: list[int] | None = None) -> float:
    """Independent frames worth of a time series: n / g, summed over trajectories."""
    lengths = lengths or [len(series)]
    out, start = 0.0, 0
    for length in lengths:
        out += length / statistical_inefficiency(series[start:start + length])
        start += length
    return out


def compare(a: Estimate, b: Estimate) -> dict[str, float]:
    """Difference ``a − b`` and its z-score against the combined standard error (independent estimates)."""
    diff = a.value - b.value
    err = math.hypot(a.error, b.error)
    return {"difference": diff, "z": diff / err if err > 0 and math.isfinite(err) else math.nan}
