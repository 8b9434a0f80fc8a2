"""bench/protein_smc.py's energy quantiles: weighted quantiles against numpy's on repeated samples."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.protein_smc import quantiles  # noqa: E402


def test_weighted_quantiles_equal_unweighted_quantiles_of_the_repeated_samples():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(50, generator=g, dtype=torch.float64) * 100
    counts = torch.randint(1, 6, (50,), generator=g)
    # integer weights = each sample repeated that many times: the inverted-CDF quantile of the repeated set
    repeated = np.repeat(u.numpy(), counts.numpy())
    expected = np.quantile(repeated, [0.05, 0.5, 0.95], method="inverted_cdf")
    got = quantiles(u, counts.double() / counts.sum())
    assert got == " / ".join(f"{v:,.0f}" for v in expected)
    # all the weight on one sample: every quantile is that sample
    w = torch.zeros(50, dtype=torch.float64)
    w[7] = 1.0
    assert quantiles(u, w) == " / ".join([f"{float(u[7]):,.0f}"] * 3)
