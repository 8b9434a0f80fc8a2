"""Samplers against a target with a known answer: a 2-D Gaussian mixture (known mean and normalising
constant) from a deliberately wrong Gaussian proposal."""

import math

import pytest
import torch

from bg.sampling import importance_sampling, smc, systematic_resample

MEANS = torch.tensor([[-2.5, 0.0], [2.5, 1.0]], dtype=torch.float64)
PI = torch.tensor([0.3, 0.7], dtype=torch.float64)
SIGMA = 0.5
LOG_C = 3.0  # target energy u = −log(exp(LOG_C) · mixture density): Z = exp(LOG_C)
TRUE_MEAN = (PI[:, None] * MEANS).sum(0)
PROPOSAL_SIGMA = 3.0  # centred, too wide and unimodal: "deliberately wrong"


def target_energy(x):
    d2 = ((x[:, None, :] - MEANS.to(x)) ** 2).sum(-1)
    log_comp = torch.log(PI.to(x)) - d2 / (2 * SIGMA**2) - math.log(2 * math.pi * SIGMA**2)
    return -(torch.logsumexp(log_comp, 1) + LOG_C)


def source_energy(x):  # −log q of the normalised proposal
    return (x**2).sum(-1) / (2 * PROPOSAL_SIGMA**2) + math.log(2 * math.pi * PROPOSAL_SIGMA**2)


def _estimates(method, n=500, repeats=24, **kw):
    means, log_zs = [], []
    for r in range(repeats):
        gen = torch.Generator().manual_seed(1000 + r)
        x = PROPOSAL_SIGMA * torch.randn(n, 2, generator=gen, dtype=torch.float64)
        if method == "is":
            res = importance_sampling(source_energy(x), target_energy(x))
        else:
            res = smc(x, source_energy, target_energy, generator=gen, **kw)
            x = res.x
        means.append((res.weights[:, None] * x).sum(0))
        log_zs.append(res.log_z)
    return torch.stack(means), torch.tensor(log_zs)


def _check_unbiased(means, log_zs):
    se_mean = means.std(0) / math.sqrt(len(means))
    assert ((means.mean(0) - TRUE_MEAN).abs() < 4 * se_mean + 1e-3).all(), (means.mean(0), TRUE_MEAN, se_mean)
    se_z = log_zs.std() / math.sqrt(len(log_zs))
    assert abs(log_zs.mean() - LOG_C) < 4 * se_z + 0.01, (log_zs.mean(), se_z)


@pytest.mark.parametrize("metropolis", [True, False], ids=["mala", "ula"])
def test_smc_is_unbiased_and_beats_importance_sampling(metropolis):
    kw = dict(n_steps=50, langevin_steps=3, step_size=0.02, metropolis=metropolis, ess_threshold=0.5)
    smc_means, smc_log_z = _estimates("smc", **kw)
    is_means, is_log_z = _estimates("is")
    if metropolis:  # exact moves: unbiased within error bars (ULA keeps an O(h) bias, compared below)
        _check_unbiased(smc_means, smc_log_z)
    _check_unbiased(is_means, is_log_z)  # IS is unbiased too, only noisier
    # Measured (MALA): RMSE of the mean 0.136 (SMC) vs 0.279 (IS), of log Z 0.092 vs 0.185, 500 particles;
    # the SMC error is about that of 500 exact samples (which mode each lands in), so the margin is 1.5×.
    rmse = lambda est, truth: float(((est - truth) ** 2).mean().sqrt())  # noqa: E731
    assert rmse(smc_means, TRUE_MEAN) * 1.5 < rmse(is_means, TRUE_MEAN)
    assert rmse(smc_log_z, torch.tensor(LOG_C)) * 1.5 < rmse(is_log_z, torch.tensor(LOG_C))


def test_smc_reaches_the_target_and_reports_its_work():
    gen = torch.Generator().manual_seed(0)
    x = PROPOSAL_SIGMA * torch.randn(400, 2, generator=gen, dtype=torch.float64)
    res = smc(x, source_energy, target_energy, n_steps=10, langevin_steps=2, step_size=0.02, metropolis=True,
              ess_threshold=1.0, energy_cut=8.0, generator=gen)
    assert len(res.ess_history) == 10 and res.resampled_at[-1] == pytest.approx(1.0)  # the path ends at t = 1
    assert 0 < res.acceptance <= 1 and 0 < res.rejection_rate < 1 and res.n_rejected > 0
    assert torch.isfinite(target_energy(res.x)[torch.isfinite(res.log_w)]).all()
    # resampling at every step copies particles: fewer distinct ancestors than particles; never: all of them
    assert 1 <= res.n_ancestors < 400
    kept = smc(x, source_energy, target_energy, n_steps=3, step_size=0.02, ess_threshold=0.0, generator=gen)
    assert kept.resampled_at == [] and kept.n_ancestors == 400
    with pytest.raises(FloatingPointError, match="every particle has weight 0"):
        smc(x, source_energy, target_energy, n_steps=2, energy_cut=-100.0, generator=gen)


def test_importance_sampling_clipping_and_rejections_are_reported():
    e0 = torch.zeros(10, dtype=torch.float64)
    e1 = -torch.arange(10, dtype=torch.float64)
    e1[0] = float("nan")
    res = importance_sampling(e0, e1, clip_top=3)
    assert res.n_rejected == 1 and res.n_clipped == 2 and res.weights[0] == 0
    assert res.log_w.max() == 7 and res.log_z == pytest.approx(math.log(sum(math.exp(k) for k in range(1, 10)) / 10))


def test_systematic_resampling_keeps_the_expected_counts():
    w = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    counts = torch.bincount(systematic_resample(w, torch.Generator().manual_seed(0)), minlength=4)
    assert counts.tolist() == [2, 1, 0, 1] or counts.tolist() == [2, 1, 1, 0]


def test_adaptive_schedule_is_unbiased_keeps_the_conditional_ess_and_ends_at_the_target():
    """The adaptive path (next t by bisection on the conditional ESS) gives unbiased estimates on the mixture,
    ends at t = 1 within n_steps points, and each unforced step keeps the CESS at its target."""
    from bg.sampling.smc import conditional_ess, next_temperature

    kw = dict(n_steps=50, langevin_steps=3, step_size=0.02, metropolis=True, schedule="adaptive", target_cess=0.9)
    _check_unbiased(*_estimates("smc", **kw))
    gen = torch.Generator().manual_seed(5)
    x = PROPOSAL_SIGMA * torch.randn(500, 2, generator=gen, dtype=torch.float64)
    res = smc(x, source_energy, target_energy, generator=gen, **kw)
    assert res.path[-1] == 1.0 and len(res.path) <= 50 and all(b > a for a, b in zip(res.path, res.path[1:]))
    assert len(set(round(b - a, 6) for a, b in zip(res.path, res.path[1:]))) > 3  # uneven steps: it adapted
    # the bisection's answer: CESS at the chosen t equals the target (or the step reached t = 1)
    gap = target_energy(x) - source_energy(x)
    log_w = torch.zeros(500, dtype=torch.float64)
    t = next_temperature(log_w, gap, 0.0, 0.01, 0.9)
    assert 0.01 < t < 1 and float(conditional_ess(log_w, -t * gap)) == pytest.approx(0.9, abs=1e-6)
    assert next_temperature(log_w, torch.zeros(500, dtype=torch.float64), 0.0, 0.01, 0.9) == 1.0  # q = p: one step
    with pytest.raises(ValueError, match="schedule"):
        smc(x, source_energy, target_energy, schedule="cosine")


class _AffineDensity(torch.nn.Module):
    """x = PROPOSAL_SIGMA · z, z ~ N(0, I₂): the proposal above written as a flow with a latent space."""

    has_latent = True

    def sample_latent(self, n):
        return torch.randn(n, 2, dtype=torch.float64)

    def latent_log_prob(self, z):
        return -0.5 * (z**2).sum(-1) - math.log(2 * math.pi)

    def from_latent(self, z):
        return PROPOSAL_SIGMA * z, torch.full((len(z),), 2 * math.log(PROPOSAL_SIGMA), dtype=z.dtype)


def test_smc_in_a_flows_latent_space_is_unbiased():
    """Particles in latent space with the pulled-back target u(f(z)) − log|det ∂x/∂z|: the same mixture mean and
    log Z as in data space (the step size in latent units is the data-space one / σ²)."""
    from bg.sampling import Proposal, SMCSampler

    proposal = Proposal(_AffineDensity(), batch_size=500)
    latent = proposal.latent()
    assert latent.latent() is latent
    z = latent.particles(7)
    torch.testing.assert_close(latent.frames(z), PROPOSAL_SIGMA * z)
    # E1 − E0 in latent space equals u + log q in data space: the SMC weights do not depend on the space
    gap = latent.target(target_energy)(z) + latent.log_prob(z)
    torch.testing.assert_close(gap, target_energy(PROPOSAL_SIGMA * z) - source_energy(PROPOSAL_SIGMA * z))
    sampler = SMCSampler(n_steps=50, langevin_steps=3, step_size=0.02 / PROPOSAL_SIGMA**2, space="latent")
    means, log_zs = [], []
    for r in range(24):
        torch.manual_seed(2000 + r)
        out = sampler(proposal, target_energy, 500, generator=torch.Generator().manual_seed(r))
        assert out["x"].shape == (500, 2)
        means.append((torch.softmax(out["log_w"], 0)[:, None] * out["x"]).sum(0))
        log_zs.append(out["log_z"])
    _check_unbiased(torch.stack(means), torch.tensor(log_zs))
    with pytest.raises(ValueError, match="space must be one of"):
        SMCSampler(space="internal")
    with pytest.raises(ValueError, match="does not expose its flow's latent space"):
        Proposal(torch.nn.Linear(2, 2), name="toy").latent()


class _SinhDensity(torch.nn.Module):
    """x = C · sinh(z), z ~ N(0, I₂): a nonlinear flow with both maps, so that latent moves that got the pull-back
    or the way back wrong would bias the estimates."""

    has_latent = has_to_latent = True
    C = 1.5

    def sample(self, n, batch_size=None):
        z = self.sample_latent(n)
        x, log_det = self.from_latent(z)
        return x, self.latent_log_prob(z) - log_det

    def log_prob(self, x):
        z = self.to_latent(x)
        return self.latent_log_prob(z) - self.from_latent(z)[1]

    def sample_latent(self, n):
        return torch.randn(n, 2, dtype=torch.float64)

    def latent_log_prob(self, z):
        return -0.5 * (z**2).sum(-1) - math.log(2 * math.pi)

    def from_latent(self, z):
        return self.C * torch.sinh(z), (math.log(self.C) + torch.log(torch.cosh(z))).sum(-1)

    def to_latent(self, x):
        return torch.asinh(x / self.C)


def test_smc_alternating_latent_and_data_moves_is_unbiased():
    """space: both: data-space particles, each step a latent MALA move (through z = f⁻¹(x)) then a data-space one:
    both leave exp(−E_t) invariant, so the mixture mean and log Z stay unbiased; each kernel reports its acceptance."""
    from bg.sampling import Proposal, SMCSampler

    proposal = Proposal(_SinhDensity(), batch_size=500)
    x = proposal.particles(5)
    torch.testing.assert_close(proposal.latent().frames(proposal.to_latent(x)), x)
    sampler = SMCSampler(n_steps=30, langevin_steps=2, step_size=0.02, space="both", latent_step_size=0.05)
    means, log_zs = [], []
    for r in range(24):
        torch.manual_seed(3000 + r)
        out = sampler(proposal, target_energy, 500, generator=torch.Generator().manual_seed(r))
        means.append((torch.softmax(out["log_w"], 0)[:, None] * out["x"]).sum(0))
        log_zs.append(out["log_z"])
        assert 0.2 < out["acceptance_latent"] <= 1 and 0.2 < out["acceptance_data"] <= 1
        assert out["acceptance"] == pytest.approx((out["acceptance_latent"] + out["acceptance_data"]) / 2, abs=0.01)
    _check_unbiased(torch.stack(means), torch.tensor(log_zs))
    with pytest.raises(ValueError, match="needs latent_step_size"):
        SMCSampler(space="both")
    with pytest.raises(ValueError, match="cannot map its particles to its flow's latent space"):
        SMCSampler(space="both", latent_step_size=0.1)(Proposal(_AffineDensity()), target_energy, 10)
