"""bench/smc_lineages.py's exact-sampler figure: all frames read 0, fewer frames read more, on average; its
table cells for weighted (and pooled) particles."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.smc_lineages import exact_sampler_w2, populations  # noqa: E402


def test_exact_sampler_w2_vanishes_for_the_whole_set_and_grows_as_draws_shrink():
    g = torch.Generator().manual_seed(0)
    angles = torch.remainder(torch.randn(4000, 2, generator=g, dtype=torch.float64) + math.pi, 2 * math.pi) - math.pi
    whole = exact_sampler_w2(angles, len(angles), repeats=3)
    assert whole.shape == (3,) and float(whole.abs().max()) < 1e-12
    small, large = exact_sampler_w2(angles, 50, repeats=20), exact_sampler_w2(angles, 1000, repeats=20)
    # i.i.d. draws: W2 of the empirical measure falls roughly as n^(-1/2) in 1-D
    assert float(small.median()) > 2 * float(large.median()) > 0


def test_pooled_cells_weigh_each_run_equally():
    """Two runs pooled with 1/2 each: a run in the φ > 0 half (αL) and one in βC7eq read 0.5 / 0.5, whatever
    their particle counts, and sit near a half-and-half reference (W2 on 256 quantiles of two point masses: not
    exactly 0); weighing particles alike instead reads 0.75 / 0.25, far from it."""
    alpha_l = torch.tensor([[1.0, 0.6]], dtype=torch.float64).repeat(30, 1)
    beta = torch.tensor([[-2.5, 2.8]], dtype=torch.float64).repeat(90, 1)
    angles = torch.cat([alpha_l, beta])
    w = torch.cat([torch.full((30,), 1 / 30), torch.full((90,), 1 / 90)]).double() / 2
    ref = {"angles": torch.cat([alpha_l.repeat(3, 1), beta])}
    cells = populations(angles, w, ref).split(" | ")
    basins = [float(v) for v in cells[0].split(" / ")]
    assert basins == [0.5, 0.0, 0.5, 0.0]  # βC7eq / αR / αL / C7ax
    assert float(cells[1]) == 0.5 and float(cells[2]) < 0.1
    alike = populations(angles, torch.full((120,), 1 / 120, dtype=torch.float64), ref).split(" | ")
    assert float(alike[1]) == 0.25 and float(alike[2]) > 1.0
    assert populations(angles, w, None).endswith("| –")
