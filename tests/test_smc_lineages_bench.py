"""bench/smc_lineages.py's exact-sampler figure: all frames read 0, fewer frames read more, on average."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.smc_lineages import exact_sampler_w2  # noqa: E402


def test_exact_sampler_w2_vanishes_for_the_whole_set_and_grows_as_draws_shrink():
    g = torch.Generator().manual_seed(0)
    angles = torch.remainder(torch.randn(4000, 2, generator=g, dtype=torch.float64) + math.pi, 2 * math.pi) - math.pi
    whole = exact_sampler_w2(angles, len(angles), repeats=3)
    assert whole.shape == (3,) and float(whole.abs().max()) < 1e-12
    small, large = exact_sampler_w2(angles, 50, repeats=20), exact_sampler_w2(angles, 1000, repeats=20)
    # i.i.d. draws: W2 of the empirical measure falls roughly as n^(-1/2) in 1-D
    assert float(small.median()) > 2 * float(large.median()) > 0
