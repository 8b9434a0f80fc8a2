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


def kish_ess(log_w: Tensor) -> Tensor:
    """Kish effective sample size divided by n, from log weights ``(n,)``: non-finite log weights (NaN
    energies, rejected or dropped samples) count as samples of weight 0; all zero → 0."""
    log_w = log_w.double().flatten()
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    return ess_from_log_sums(torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0), len(log_w))
