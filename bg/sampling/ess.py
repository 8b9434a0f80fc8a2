"""The effective sample size of importance weights, the one definition used across the package."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def ess_from_log_sums(log_sum_w: Tensor, log_sum_w2: Tensor, n: int | Tensor) -> Tensor:
    """Kish ESS / n = (Σw)² / (n Σw²) from log Σw and log Σw² (what a DDP metric accumulates); 0 when every
    weight is zero or there are no samples."""
    if int(n) == 0 or not torch.isfinite(log_sum_w):
        return torch.zeros((), dtype=torch.float64, device=log_sum_w.device)
    return torch.exp(2 * log_sum_w - log_sum_w2) / n


def finite_log_weights(log_w: Tensor) -> Tensor:
    """Log weights ``(n,)`` as float64, detached, with non-finite values (NaN energies, rejected or dropped
    samples) as −inf: weight 0."""
    log_w = log_w.detach().double().flatten()
    return torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))


def normalised_weights(log_w: Tensor) -> Tensor:
    """Self-normalised weights ``(n,)`` float64 from log weights (non-finite ones weigh 0); all zeros when no
    sample has weight."""
    lw = finite_log_weights(log_w)
    return torch.softmax(lw, 0) if torch.isfinite(lw).any() else torch.zeros_like(lw)


def log_sum_weights(log_w: Tensor, mask: Tensor | None = None) -> Tensor:
    """log Σ w over the samples where ``mask`` ``(n,)`` holds (all samples without one); −inf when none has
    weight. The one reduction behind every importance-weighted estimate: the training-time metrics
    (``bg.metrics``) and the analysis (``bg.estimators``) both call it, so their values agree exactly."""
    lw = finite_log_weights(log_w)
    if mask is not None:
        lw = torch.where(mask.flatten().to(lw.device), lw, torch.full_like(lw, -math.inf))
    return torch.logsumexp(lw, 0)


def kish_ess(log_w: Tensor) -> Tensor:
    """Kish effective sample size divided by n, from log weights ``(n,)``: non-finite log weights (NaN
    energies, rejected or dropped samples) count as samples of weight 0; all zero → 0."""
    lw = finite_log_weights(log_w)
    return ess_from_log_sums(log_sum_weights(lw), log_sum_weights(2 * lw), len(lw))
