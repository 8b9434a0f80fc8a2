"""Error bars on known answers: the 95 % intervals of bg.estimators contain the exact value in 90–98 % of
200 independent repeats — importance-weighted populations and free-energy differences of a Gaussian mixture
with unequal weights, under proposals of different quality (ESS ≥ 100 samples), and MD-style means and
populations of AR(1) series with a known autocorrelation time."""

import math

import pytest
import torch

from bg.estimators import (SampleSet, effective_frames, free_energy_differences, free_energy_surface, populations,
                           statistical_inefficiency)

REPEATS = 200
#: target: 0.25 N(−2, 0.7²) + 0.75 N(1.5, 1); states A = {x < 0}, B = {x ≥ 0}
WEIGHTS, MEANS, SDS = (0.25, 0.75), (-2.0, 1.5), (0.7, 1.0)


def normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


P_A = sum(w * normal_cdf((0 - m) / s) for w, m, s in zip(WEIGHTS, MEANS, SDS))
DF_B = -math.log((1 - P_A) / P_A)  # F_B − F_A in kT


def log_target(x: torch.Tensor) -> torch.Tensor:
    comps = [math.log(w) - 0.5 * ((x - m) / s) ** 2 - math.log(s) for w, m, s in zip(WEIGHTS, MEANS, SDS)]
    return torch.logsumexp(torch.stack(comps), 0)  # unnormalised: the estimators never need Z


def covered(e, truth: float) -> bool:
    return e.low <= truth <= e.high


@pytest.mark.parametrize("loc, scale, n", [(0.0, 3.0, 1000), (0.5, 2.0, 600), (-1.0, 4.0, 2000)])
def test_weighted_intervals_cover_the_exact_populations_and_free_energy(loc, scale, n):
    gen = torch.Generator().manual_seed(int(100 * scale + n))
    hits_p = hits_df = 0
    for r in range(REPEATS):
        x = loc + scale * torch.randn(n, generator=gen, dtype=torch.float64)
        log_w = log_target(x) + 0.5 * ((x - loc) / scale) ** 2
        s = SampleSet(log_w, n_boot=300, seed=r)
        assert s.ess() >= 100
        states = (x >= 0).long()
        p = populations(states, 2, s)
        df = free_energy_differences(states, 2, s)
        assert p[0].reliable and df[1].reliable
        assert df[0].value == 0.0 and df[0].error == 0.0
        hits_p += covered(p[0], P_A)
        hits_df += covered(df[1], DF_B)
    assert 0.90 <= hits_p / REPEATS <= 0.98, hits_p / REPEATS
    assert 0.90 <= hits_df / REPEATS <= 0.98, hits_df / REPEATS


def test_too_few_effective_samples_are_flagged():
    gen = torch.Generator().manual_seed(0)
    x = 3.0 + 0.3 * torch.randn(500, generator=gen, dtype=torch.float64)  # far too narrow, off-centre
    log_w = log_target(x) + 0.5 * ((x - 3.0) / 0.3) ** 2
    s = SampleSet(log_w, n_boot=100)
    assert s.ess() < 100
    est = populations((x >= 0).long(), 2, s)
    assert not est[0].reliable and "ESS" in est[0].note and "(!)" in est[0].format()


def ar1(n: int, rho: float, mean: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(n, generator=gen, dtype=torch.float64)
    y = torch.empty(n, dtype=torch.float64)
    y[0] = noise[0] / math.sqrt(1 - rho**2)  # start in the stationary distribution
    for t in range(1, n):
        y[t] = rho * y[t - 1] + noise[t]
    return y + mean


def test_md_intervals_cover_the_exact_mean_and_population_of_an_ar1_process():
    rho, mean, n = 0.8, 0.3, 2000
    sd = 1 / math.sqrt(1 - rho**2)
    p_pos = normal_cdf(mean / sd)
    gen = torch.Generator().manual_seed(1)
    hits_mean = hits_pop = 0
    for _ in range(REPEATS):
        y = ar1(n, rho, mean, gen)
        s = SampleSet(None, n=n)
        hits_mean += covered(s.estimate(y[:, None])[0], mean)
        hits_pop += covered(populations((y > 0).long(), 2, s)[1], p_pos)
    assert 0.90 <= hits_mean / REPEATS <= 0.98, hits_mean / REPEATS
    assert 0.90 <= hits_pop / REPEATS <= 0.98, hits_pop / REPEATS


def test_md_error_bar_is_the_known_one_and_trajectories_add_up():
    rho, n = 0.9, 20000
    gen = torch.Generator().manual_seed(2)
    y = ar1(n, rho, 0.0, gen)
    # the standard error of the mean of AR(1): sqrt(g σ² / n), g = (1 + ρ)/(1 − ρ), σ² = 1/(1 − ρ²)
    exact = math.sqrt((1 + rho) / (1 - rho) / (1 - rho**2) / n)
    assert SampleSet(None, n=n).estimate(y[:, None])[0].error == pytest.approx(exact, rel=0.15)
    assert statistical_inefficiency(y) == pytest.approx((1 + rho) / (1 - rho), rel=0.15)
    assert effective_frames(y) == pytest.approx(n / 19, rel=0.15)
    # two independent trajectories: each its own g, the errors combine like independent halves
    two = torch.cat([ar1(n // 2, rho, 0.0, gen), ar1(n // 2, rho, 0.0, gen)])
    assert SampleSet(None, n=n, lengths=[n // 2, n // 2]).estimate(two[:, None])[0].error == pytest.approx(exact, rel=0.15)
    with pytest.raises(ValueError, match="do not add up"):
        SampleSet(None, n=n, lengths=[5, 6])


def test_free_energy_surface_of_uniform_samples_is_flat_and_empty_bins_are_infinite():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(20000, generator=gen, dtype=torch.float64)
    bins = (x * 10).long()  # 10 bins of equal probability; bin 10 … 11 empty
    surface, lowest = free_energy_surface(bins, 12, SampleSet(torch.zeros(20000), n_boot=200))
    assert surface[lowest].value == 0.0
    assert surface[lowest].error == 0.0
    for k, e in enumerate(surface[:10]):
        if k != lowest:  # Var(ln p̂_k − ln p̂_l) ≈ 2 / (n p) for two bins of probability p
            assert 0 <= e.value < 4 * e.error and e.error == pytest.approx(math.sqrt(2 / (20000 * 0.1)), rel=0.3)
    assert surface[10].value == math.inf and surface[11].value == math.inf
