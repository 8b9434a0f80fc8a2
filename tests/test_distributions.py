import math

import pytest
import torch
from scipy import stats

from bg.flows import CoordinateBase


def make_base(bounded, torsion):
    circular = torch.tensor([False, False, True, True])
    low = torch.tensor([0.08, 1.5, -math.pi, -math.pi], dtype=torch.float64)
    high = torch.tensor([0.12, 2.5, math.pi, math.pi], dtype=torch.float64)
    base = CoordinateBase(circular, low, high, bounded=bounded, torsion=torsion)
    torch.manual_seed(0)
    data = torch.stack([0.1 + 0.004 * torch.randn(5000), 1.9 + 0.1 * torch.randn(5000),
                        torch.remainder(1.0 + 0.5 * torch.randn(5000) + math.pi, 2 * math.pi) - math.pi,
                        (torch.rand(5000) * 2 - 1) * math.pi], 1).double()
    return base.fit(data), data


@pytest.mark.parametrize("bounded", ["uniform", "truncated_normal"])
@pytest.mark.parametrize("torsion", ["uniform", "von_mises"])
def test_base_density_normalised_and_samples_in_domain(bounded, torsion):
    base, _ = make_base(bounded, torsion)
    centre = base.loc[None]
    for j in range(4):
        # log_prob is a sum over coordinates: remove the others (scipy's closed forms) and integrate.
        grid = torch.linspace(float(base.low[j]), float(base.high[j]), 20001, dtype=torch.float64)
        u = centre.expand(len(grid), 4).clone()
        u[:, j] = grid
        others = sum(_one(base, k, centre[0, k]) for k in range(4) if k != j)
        mass = torch.trapezoid(torch.exp(base.log_prob(u) - others), grid)
        assert abs(float(mass) - 1) < 1e-3, (j, float(mass))
    x = base.sample(20000, dtype=torch.float64)
    assert ((x >= base.low) | base.circular).all() and ((x <= base.high) | base.circular).all()
    assert (x[:, 2:] >= -math.pi).all() and (x[:, 2:] < math.pi).all()


def _one(base, k, value):
    lo, hi, loc, scale = (float(t[k]) for t in (base.low, base.high, base.loc, base.scale))
    if bool(base.circular[k]):
        if base.torsion == "uniform":
            return -math.log(2 * math.pi)
        return stats.vonmises.logpdf(float(value), scale, loc=loc)
    if base.bounded == "uniform":
        return -math.log(hi - lo)
    a, b = (lo - loc) / scale, (hi - loc) / scale
    return stats.truncnorm.logpdf(float(value), a, b, loc=loc, scale=scale)


@pytest.mark.parametrize("bounded", ["uniform", "truncated_normal"])
@pytest.mark.parametrize("torsion", ["uniform", "von_mises"])
def test_base_log_prob_matches_scipy(bounded, torsion):
    base, _ = make_base(bounded, torsion)
    x = base.sample(50, dtype=torch.float64)
    ours = base.log_prob(x)
    ref = torch.tensor([sum(_one(base, k, row[k]) for k in range(4)) for row in x], dtype=torch.float64)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_base_fit_and_samples_statistics():
    base, data = make_base("truncated_normal", "von_mises")
    x = base.sample(40000, dtype=torch.float64)
    assert abs(x[:, 0].mean() - data[:, 0].mean()) < 2e-4
    assert abs(x[:, 1].std() - data[:, 1].std()) < 5e-3
    circ_mean = torch.atan2(torch.sin(x[:, 2]).mean(), torch.cos(x[:, 2]).mean())
    assert abs(float(circ_mean) - 1.0) < 0.03


def test_unknown_base_is_clear():
    c = torch.tensor([True])
    with pytest.raises(ValueError, match="torsion must be one of"):
        CoordinateBase(c, torch.zeros(1), torch.ones(1), torsion="wrapped_cauchy")
