"""Self-normalised importance sampling with optional clipping of the largest log-weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bg.sampling.ess import kish_ess


@dataclass
class ISResult:
    """Attributes:
        log_w: log importance weights ``(n,)`` (float64; −inf for rejected samples), after clipping.
        weights: self-normalised weights ``(n,)``, summing to 1.
        ess: Kish effective sample size / n of the (clipped) weights.
        log_z: log of the normalising-constant ratio Z_target / Z_source, from the unclipped weights.
        n_clipped: how many log-weights were lowered to the clipping threshold.
        n_rejected: samples with a non-finite energy (weight 0).
    """

    log_w: Tensor
    weights: Tensor
    ess: float
    log_z: float
    n_clipped: int
    n_rejected: int


def importance_sampling(source_energy: Tensor, target_energy: Tensor, clip_top: int | float | None = None) -> ISResult:
    """Weights w ∝ exp(E0(x) − E1(x)) of samples x ~ q, where E0 = −log q (source) and E1 = u (target).

    Args:
        source_energy: E0 of the samples ``(n,)``, i.e. −log q(x) (for a flow: ``-log_q``).
        target_energy: E1 of the samples ``(n,)`` (kT).
        clip_top: clip the largest log-weights to the value of the k-th largest (k = ``clip_top`` if
            an int ≥ 1, else the fraction ``clip_top`` of n); trades a little bias for variance.
            The number clipped is reported; ``log_z`` always uses the unclipped weights.
    """
    log_w = (source_energy.double() - target_energy.double())
    rejected = ~torch.isfinite(log_w)
    log_w = torch.where(rejected, torch.full_like(log_w, -math.inf), log_w)
    n = log_w.numel()
    log_z = float(torch.logsumexp(log_w, 0) - math.log(n)) if n else math.nan
    n_clipped = 0
    if clip_top is not None and n:
        k = int(clip_top) if clip_top >= 1 else max(1, int(math.ceil(clip_top * n)))
        k = min(k, n)
        threshold = torch.topk(log_w, k).values[-1]
        n_clipped = int((log_w > threshold).sum())
        log_w = torch.minimum(log_w, threshold)
    weights = torch.softmax(log_w, 0)
    ess = float(kish_ess(log_w)) if n else 0.0
    return ISResult(log_w=log_w, weights=weights, ess=ess, log_z=log_z, n_clipped=n_clipped,
                    n_rejected=int(rejected.sum()))
