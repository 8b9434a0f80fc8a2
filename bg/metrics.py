"""Sample-quality metrics as torchmetrics ``Metric``\\ s: correct under DDP (states are reduced across
ranks before ``compute``), usable outside Lightning too.

- :class:`EffectiveSampleSize`: Kish ESS / n of importance weights from log weights.
- :class:`DistanceDistortion`: ΔD, mean over atom pairs of |mean generated − mean reference distance|.
- :class:`Wasserstein1D`: 2-Wasserstein distance between generated and reference values, per
  column, optionally periodic (torsions) and optionally weighted (reweighted samples).

Plain functions for the same quantities (``kish_ess`` from ``bg.sampling.ess``, ``w2_1d``,
``circular_w2_1d``, ``pairwise_distances``) are shared with the models and the benchmarks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from bg.sampling.ess import ess_from_log_sums, finite_log_weights, kish_ess, log_sum_weights

__all__ = ["DistanceDistortion", "EffectiveSampleSize", "Wasserstein1D", "WeightedFraction", "circular_w2_1d", "kish_ess",
           "pairwise_distances", "w2_1d"]


def _logsumexp_reduce(t: Tensor) -> Tensor:
    return torch.logsumexp(t, dim=0)


class EffectiveSampleSize(Metric):
    """Kish ESS / n = (Σw)² / (n Σw²), accumulated as log Σw and log Σw² (log-sum-exp across ranks).

    ``update(log_w)``: log importance weights ``(B,)``. Non-finite log weights (NaN energies,
    overflows) count as samples of weight zero, so failures lower the ESS instead of vanishing.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("log_sum_w", torch.tensor(-math.inf, dtype=torch.float64), dist_reduce_fx=_logsumexp_reduce)
        self.add_state("log_sum_w2", torch.tensor(-math.inf, dtype=torch.float64), dist_reduce_fx=_logsumexp_reduce)
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, log_w: Tensor) -> None:
        lw = finite_log_weights(log_w)
        self.log_sum_w = torch.logaddexp(self.log_sum_w, log_sum_weights(lw))
        self.log_sum_w2 = torch.logaddexp(self.log_sum_w2, log_sum_weights(2 * lw))
        self.n += len(lw)

    def compute(self) -> Tensor:
        return ess_from_log_sums(self.log_sum_w, self.log_sum_w2, self.n)


def pairwise_distances(x: Tensor, pairs: Tensor) -> Tensor:
    """Distances ``(B, P)`` of atom pairs ``(P, 2)`` in frames ``(B, N, 3)`` (explicit differences:
    ``torch.cdist`` loses ~1e-8 nm far from the origin)."""
    return (x[:, pairs[:, 0]] - x[:, pairs[:, 1]]).norm(dim=-1)


class DistanceDistortion(Metric):
    """ΔD (nm): mean over atom pairs of |⟨d_ij⟩_generated − ⟨d_ij⟩_reference|.

    ``reference_mean``: ``(P,)`` mean reference distances of the pairs; ``update(d)`` with generated
    distances ``(B, P)``. Non-finite rows (exploded samples) are skipped and counted in ``n_skipped``.
    """

    full_state_update = False

    def __init__(self, reference_mean: Tensor, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("reference_mean", reference_mean.double().clone(), persistent=False)
        p = len(reference_mean)
        self.add_state("total", torch.zeros(p, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_skipped", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, d: Tensor) -> None:
        d = d.detach().double()
        ok = torch.isfinite(d).all(-1)
        self.total += d[ok].sum(0)
        self.n += int(ok.sum())
        self.n_skipped += int((~ok).sum())

    def compute(self) -> Tensor:
        if self.n == 0:
            return torch.tensor(math.inf, dtype=torch.float64)
        return (self.total / self.n - self.reference_mean.to(self.total.device)).abs().mean()


def _quantiles(values: Tensor, weights: Tensor | None, m: int) -> Tensor:
    """``m`` mid-point quantiles per column of ``values`` ``(n, C)`` (weighted if ``weights`` ``(n,)``)."""
    v, order = torch.sort(values, dim=0)
    n = len(values)
    levels = (torch.arange(m, dtype=torch.float64, device=values.device) + 0.5) / m
    if weights is None:
        cdf = ((torch.arange(n, dtype=torch.float64, device=values.device) + 0.5) / n)[:, None].expand_as(v)
    else:
        w = weights.double() / weights.double().sum()
        wc = w[order]  # (n, C)
        cdf = torch.cumsum(wc, 0) - 0.5 * wc
    idx = torch.searchsorted(cdf.T.contiguous(), levels.expand(v.shape[1], m).contiguous()).clamp(max=n - 1)
    return v.gather(0, idx.T)


def w2_1d(a: Tensor, b: Tensor, weights_a: Tensor | None = None, m: int = 1024) -> Tensor:
    """2-Wasserstein distance per column between samples ``a`` ``(n, C)`` and ``b`` ``(k, C)``
    (quantile functions on an ``m``-point grid; exact for equal, unweighted sizes ``n = k = m``)."""
    qa, qb = _quantiles(a.double(), weights_a, m), _quantiles(b.double(), None, m)
    return ((qa - qb) ** 2).mean(0).sqrt()


def circular_w2_1d(a: Tensor, b: Tensor, weights_a: Tensor | None = None, m: int = 256) -> Tensor:
    """Periodic 2-Wasserstein distance per column of angles (rad, period 2π).

    On the circle the optimal matching of two sorted, equally weighted point sets is a cyclic shift
    of one against the other (convex cost), so the distance is the minimum over the m shifts of the
    mean squared periodic difference between the ``m`` quantiles of each sample.
    """
    qa, qb = _quantiles(a.double(), weights_a, m), _quantiles(b.double(), None, m)
    out = []
    for c in range(qa.shape[1]):
        shifted = torch.stack([torch.roll(qb[:, c], k) for k in range(m)])  # (m, m)
        diff = torch.remainder(qa[:, c][None] - shifted + math.pi, 2 * math.pi) - math.pi
        out.append((diff**2).mean(1).min().sqrt())
    return torch.stack(out)


class Wasserstein1D(Metric):
    """Mean over columns of the 1-D 2-Wasserstein distance between generated values and a reference.

    ``reference``: ``(k, C)`` values (e.g. held-out MD energies or φ/ψ). ``update(values, log_w=None)``:
    generated values ``(B, C)`` and, for a reweighted estimate, their log importance weights.
    Rows with non-finite values are dropped (report the finite fraction separately).
    ``periodic=True`` treats values as angles.
    """

    full_state_update = False

    def __init__(self, reference: Tensor, periodic: bool = False, weighted: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("reference", reference.double().reshape(len(reference), -1).clone(), persistent=False)
        self.periodic, self.weighted = periodic, weighted
        self.add_state("values", [], dist_reduce_fx="cat")
        self.add_state("log_w", [], dist_reduce_fx="cat")

    def update(self, values: Tensor, log_w: Tensor | None = None) -> None:
        values = values.detach().double().reshape(len(values), -1)
        if self.weighted and log_w is None:
            raise ValueError("a weighted Wasserstein1D needs log_w in update()")
        lw = log_w.detach().double() if log_w is not None else torch.zeros(len(values), dtype=torch.float64,
                                                                           device=values.device)
        ok = torch.isfinite(values).all(-1) & torch.isfinite(lw)
        self.values.append(values[ok])
        self.log_w.append(lw[ok])

    def compute(self) -> Tensor:
        values = torch.cat(self.values) if isinstance(self.values, list) else self.values
        log_w = torch.cat(self.log_w) if isinstance(self.log_w, list) else self.log_w
        if len(values) == 0:
            return torch.tensor(math.inf, dtype=torch.float64)
        weights = torch.softmax(log_w, 0) if self.weighted else None
        ref = self.reference.to(values.device)
        dist = circular_w2_1d(values, ref, weights) if self.periodic else w2_1d(values, ref, weights)
        return dist.mean()


class WeightedFraction(Metric):
    """Self-normalised importance-weighted fraction Σ_{mask} w / Σ w, kept as log-sum-exp states so
    that it is exact across ranks and for log weights far from 0 (e.g. a reweighted basin population).

    ``update(log_w, mask)``: log weights ``(B,)`` and a boolean ``(B,)``; non-finite weights count as 0.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("log_in", torch.tensor(-math.inf, dtype=torch.float64), dist_reduce_fx=_logsumexp_reduce)
        self.add_state("log_all", torch.tensor(-math.inf, dtype=torch.float64), dist_reduce_fx=_logsumexp_reduce)

    def update(self, log_w: Tensor, mask: Tensor) -> None:
        self.log_all = torch.logaddexp(self.log_all, log_sum_weights(log_w))
        self.log_in = torch.logaddexp(self.log_in, log_sum_weights(log_w, mask))

    def compute(self) -> Tensor:
        if not torch.isfinite(self.log_all):
            return torch.tensor(math.nan, dtype=torch.float64)
        return torch.exp(self.log_in - self.log_all)
