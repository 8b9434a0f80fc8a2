"""bench/torsion_start.py: the mean log density of torsion values under a table of bin probabilities."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from torsion_start import torsion_log_likelihood  # noqa: E402


def test_torsion_log_likelihood_reads_bin_densities_per_radian():
    angles = torch.tensor([[-3.0, 0.5], [-0.1, 3.1], [2.0, -math.pi]], dtype=torch.float64)
    uniform = torch.full((2, 36), 1 / 36, dtype=torch.float64)
    torch.testing.assert_close(torsion_log_likelihood(uniform, angles), torch.full((2,), -math.log(2 * math.pi),
                                                                                    dtype=torch.float64))
    halves = torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64)  # [−π, 0) and [0, π)
    # torsion 1: two values in [−π, 0) and one in [0, π); torsion 2: densities 0.5/π whatever the values
    expected = torch.tensor([(2 * math.log(0.75 / math.pi) + math.log(0.25 / math.pi)) / 3, math.log(0.5 / math.pi)],
                            dtype=torch.float64)
    torch.testing.assert_close(torsion_log_likelihood(halves, angles), expected)
