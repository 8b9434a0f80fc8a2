"""TabulatedCircular: the CDF map of a piecewise-constant density on the circle, checked against the density
it tabulates (sampling and log-determinants), autograd and its own inverse."""

import math

import pytest
import torch

from bg.flows.tabulated import TabulatedCircular, boltzmann_table
from bg.flows.transferable_nsf import TransferableSplineFlow


@pytest.fixture
def layer():
    k = 72
    centres = -math.pi + (torch.arange(k, dtype=torch.float64) + 0.5) * 2 * math.pi / k
    energy = torch.stack([3 * (1 + torch.cos(3 * centres)), 4 * (1 - torch.cos(centres - 1.0))])  # a rotor, one well
    chosen = torch.tensor([False, True, False, True])
    return TabulatedCircular(chosen, boltzmann_table(energy, temperature=1.0, floor=0.1)), chosen


def test_round_trip_and_log_det_against_autograd(layer):
    layer, chosen = layer
    torch.manual_seed(0)
    z = (torch.rand(64, 4, dtype=torch.float64) * 2 - 1) * math.pi
    t, ld = layer(z)
    back, ld_inv = layer.inverse(t)
    torch.testing.assert_close(back, z, rtol=0, atol=1e-10)
    torch.testing.assert_close(ld_inv, -ld)
    assert (t[:, ~chosen] == z[:, ~chosen]).all() and (t.abs() <= math.pi).all()
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], z[0])
    torch.testing.assert_close(torch.logdet(jac), ld[0])


def test_uniform_input_gives_the_tabulated_density(layer):
    layer, chosen = layer
    torch.manual_seed(1)
    n = 200_000
    phi, _ = layer.inverse((torch.rand(n, 4, dtype=torch.float64) * 2 - 1) * math.pi)
    for row, i in enumerate(torch.nonzero(chosen).flatten().tolist()):
        counts = torch.histc(phi[:, i], layer.bins, -math.pi, math.pi) / n
        # multinomial noise: σ = √(p (1 − p) / n) per bin
        sigma = (layer.probability[row] * (1 - layer.probability[row]) / n).sqrt()
        assert float(((counts - layer.probability[row]).abs() / sigma).max()) < 5.0
    # the map is continuous on the circle: −π and π go to the two ends
    ends = torch.tensor([[-math.pi] * 4, [math.pi - 1e-12] * 4], dtype=torch.float64)
    t, _ = layer(ends)
    torch.testing.assert_close(t[:, chosen], ends[:, chosen], rtol=0, atol=1e-9)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="shape"):
        TabulatedCircular(torch.tensor([True, True]), torch.full((1, 4), 0.25))
    with pytest.raises(ValueError, match="positive"):
        TabulatedCircular(torch.tensor([True]), torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="floor"):
        boltzmann_table(torch.zeros(1, 4), floor=1.5)


def test_bad_scan_options_are_refused():
    with pytest.raises(ValueError, match="torsion_prior"):
        TransferableSplineFlow(torsion_prior="rigid")
    with pytest.raises(ValueError, match="scan_temperature must be > 0"):
        TransferableSplineFlow(torsion_prior="scan", scan_temperature=0.0)
    with pytest.raises(ValueError, match="scan_floor in"):
        TransferableSplineFlow(torsion_prior="scan", scan_floor=0.0)
