"""TarFlowGenerator: soft equivariance, CoM corrections against exact densities, samplers, checkpoints."""

import math

import pytest
import scipy.stats
import torch

from bg.coordinates import add_com_noise, centre_of_mass, centred, com_log_density
from bg.models import TarFlowGenerator
from bg.sampling import ImportanceSampler, Sampler, SMCSampler
from callbacks import SampleEvaluation

TINY = dict(channels=16, blocks=2, layers=1, heads=2, sample_batch_size=64)


@pytest.fixture(scope="module")
def frames(aldp_frames):
    return torch.as_tensor(aldp_frames)


@pytest.fixture()
def model(aldp_system, frames):
    torch.manual_seed(0)
    m = TarFlowGenerator(**TINY)
    m.build(aldp_system, frames)
    return m.double()


def test_chi3_and_gaussian_com_densities_match_scipy():
    x = torch.randn(50, 7, 3, dtype=torch.float64) * 0.3
    sigma = 0.4
    r = centre_of_mass(x).norm(dim=-1)
    chi = torch.as_tensor(scipy.stats.chi.logpdf((r / sigma).numpy(), df=3)) - math.log(sigma)
    torch.testing.assert_close(com_log_density(x, sigma, "chi3"), chi)
    # Gaussian: density of the orthonormal CoM coordinate sqrt(N)·c, with std sqrt(N)·sigma per axis
    c = centre_of_mass(x) * math.sqrt(7)
    gauss = torch.as_tensor(scipy.stats.norm.logpdf(c.numpy(), scale=math.sqrt(7) * sigma).sum(-1))
    torch.testing.assert_close(com_log_density(x, sigma, "gaussian"), gauss)
    assert torch.equal(com_log_density(x, sigma, "none"), torch.zeros(50, dtype=torch.float64))
    with pytest.raises(ValueError, match="com_correction must be one of"):
        com_log_density(x, sigma, "radial")


def test_gaussian_com_correction_gives_the_exact_density_of_the_centred_frame(model):
    # The untrained flow is the identity, i.e. N(0, I) on all 3N numbers. Its exact density of the
    # centred shape y on the 3(N−1)-dimensional subspace is N(0, I) there; with com_sigma = 1/√N the
    # Gaussian CoM correction recovers it exactly, for samples (random CoM) and for frames (CoM 0).
    n_atoms = model.system.topology.n_atoms
    x, log_q = model.density.rsample(200)
    y = x / model.scale
    exact = (-0.5 * y.square().sum((1, 2)) - 1.5 * (n_atoms - 1) * math.log(2 * math.pi)
             - 3 * (n_atoms - 1) * torch.log(model.scale))
    assert centre_of_mass(x).abs().max() < 1e-12
    torch.testing.assert_close(log_q, exact, rtol=0, atol=1e-8)
    shifted = x + torch.randn(200, 1, 3, dtype=torch.float64)  # log_prob ignores where a frame is
    torch.testing.assert_close(model.log_prob(shifted), exact, rtol=0, atol=1e-8)


def test_augmentation_rotates_rigidly_and_adds_com_noise_of_the_set_size(model, frames):
    x = frames[:100]
    torch.manual_seed(1)
    xf = model.augment(x)
    d = torch.cdist(xf, xf)
    centred = (x - x.mean(1, keepdim=True)) / model.scale
    torch.testing.assert_close(d, torch.cdist(centred, centred), rtol=0, atol=1e-9)
    assert not torch.allclose(xf - centre_of_mass(xf)[:, None], centred, atol=1e-3)  # actually rotated
    com = centre_of_mass(add_com_noise(torch.zeros(20000, 22, 3, dtype=torch.float64), 0.2))
    assert abs(float(com.std()) - 0.2) < 0.005


def test_importance_and_smc_outputs_are_consistent(model):
    torch.manual_seed(2)
    proposal = model.proposal
    out = ImportanceSampler()(proposal, model.energy, 64)
    torch.testing.assert_close(out["log_w"], -out["energy_kT"] - out["log_q"])
    assert out["sampler"] == "importance" and 0 < out["ess"] <= 1
    clipped = ImportanceSampler(clip_top=5)(proposal, model.energy, 64)
    assert clipped["n_clipped"] >= 1 and clipped["ess"] >= 1 / 64
    # SMC particles live on all 3N coordinates (CoM kept): E0 − E1 there are the extended-space
    # importance log-weights; for the identity flow they equal −u − log q(centred frame) up to a constant.
    s = proposal.particles(16)
    assert centre_of_mass(s).abs().max() > 1e-4
    lw = -proposal.log_prob(s) - proposal.target(model.energy)(s)
    frames = proposal.frames(s)
    diff = lw - (-model.energy(frames) - model.log_prob(frames))
    torch.testing.assert_close(diff, diff[:1].expand(16), rtol=0, atol=1e-4)
    smc = SMCSampler(n_steps=4, langevin_steps=1, step_size=1e-7, batch_size=16)(
        proposal, model.energy, 32, generator=torch.Generator().manual_seed(0))
    assert smc["x"].shape == (32, 22, 3) and smc["sampler"] == "smc" and len(smc["ess_history"]) == 4
    assert centre_of_mass(smc["x"]).abs().max() < 1e-12
    assert 0 <= smc["acceptance"] <= 1 and torch.isfinite(smc["energy_kT"]).all()
    # torsion turns act on the same particles; the proposal carries the molecule's topology for them
    turned = SMCSampler(n_steps=2, langevin_steps=1, step_size=1e-7, batch_size=16, torsion_moves=3)(
        proposal, model.energy, 32, generator=torch.Generator().manual_seed(0))
    assert 0 <= turned["acceptance_torsion"] <= 1 and 0 <= turned["acceptance_data"] <= 1
    assert centre_of_mass(turned["x"]).abs().max() < 1e-12 and torch.isfinite(turned["energy_kT"]).all()


def test_options_are_checked():
    with pytest.raises(ValueError, match="tokens must be one of"):
        TarFlowGenerator(tokens="residue")
    with pytest.raises(ValueError, match="com_correction must be one of"):
        TarFlowGenerator(com_correction="chi")
    with pytest.raises(ValueError, match="scale must be positive"):
        TarFlowGenerator(scale=0.0)
    with pytest.raises(ValueError, match="clip_top must be positive"):
        ImportanceSampler(clip_top=0)
    with pytest.raises(ValueError, match="step_size > 0"):
        SMCSampler(step_size=0.0)
    with pytest.raises(ValueError, match="smc_samples"):
        SampleEvaluation(smc_samples=0)


def test_an_unknown_sampler_is_refused(model):
    with pytest.raises(TypeError, match="use bg.sampling.ImportanceSampler or SMCSampler"):
        Sampler()(model.proposal, model.energy, 4)


def test_coordinate_tokens_and_a_checkpointed_scale(aldp_system, frames, tmp_path):
    torch.manual_seed(3)
    m = TarFlowGenerator(tokens="coordinate", **TINY)
    m.build(aldp_system, frames)
    assert m.flow.net.n_tokens == 66 and m.flow.net.token_dim == 1
    fitted = float(m.scale)
    centred = frames - frames.mean(1, keepdim=True)
    assert fitted == pytest.approx(float(centred.square().mean().sqrt()))
    for block in m.flow.net.blocks:  # not the identity any more
        torch.nn.init.normal_(block.out.weight, std=0.05)
    restored = TarFlowGenerator(tokens="coordinate", **TINY)
    restored.build(aldp_system, None)
    restored.load_state_dict(m.state_dict())
    assert float(restored.scale) == fitted
    with torch.no_grad():
        torch.testing.assert_close(restored.log_prob(frames[:10]), m.log_prob(frames[:10]))


# ---------------------------------------------------------------------------------------------- body frame
@pytest.fixture()
def framed(aldp_system, frames):
    torch.manual_seed(4)
    m = TarFlowGenerator(representation="frame", **TINY)
    m.build(aldp_system, frames)
    for block in m.flow.net.blocks:  # not the identity
        torch.nn.init.normal_(block.out.weight, std=0.05)
    return m.double()


def test_body_frame_density_is_exact_and_invariant(framed, frames, aldp_system, tmp_path):
    assert framed.flow.net.n_tokens == 20 and framed.proposal.__class__.__name__ == "Proposal"
    x, log_q = framed.sample(32)
    torch.testing.assert_close(framed.log_prob(x), log_q, rtol=0, atol=1e-8)  # sample and log_prob agree
    torch.testing.assert_close(centre_of_mass(x), torch.zeros(32, 3, dtype=x.dtype), rtol=0, atol=1e-12)
    moved = x.flip(-1) * torch.tensor([1.0, -1.0, 1.0], dtype=x.dtype) + 0.3  # a proper rotation, then a shift
    torch.testing.assert_close(framed.log_prob(moved), log_q, rtol=0, atol=1e-8)
    assert (framed.log_prob(-x) - log_q).abs().max() > 1.0  # mirror images are other molecules
    # the loss is the NLL of the frames, with no augmentation
    torch.testing.assert_close(framed.term_nll(frames[:16]), -framed.log_prob(frames[:16]).mean())
    with pytest.raises(RuntimeError, match="no global scale"):
        framed.scale
    # the standardisation travels with the checkpoint's state
    restored = TarFlowGenerator(representation="frame", **TINY)
    restored.build(aldp_system, None)
    restored.load_state_dict(framed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored.double().log_prob(frames[:10]), framed.log_prob(frames[:10]))
    out = ImportanceSampler()(framed.proposal, framed.energy, 64)
    torch.testing.assert_close(out["log_w"], -out["energy_kT"] - out["log_q"])
    smc = SMCSampler(n_steps=2, langevin_steps=1, step_size=1e-7, batch_size=16)(
        framed.proposal, framed.energy, 16, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(smc["energy_kT"]).all()
    with pytest.raises(ValueError, match="representation must be one of"):
        TarFlowGenerator(representation="internal")


@pytest.mark.parametrize("which", ["framed", "model"])
def test_the_latent_map_gives_the_flows_density_and_smc_moves_there(which, request):
    """``from_latent`` (the sequential inverse with a KV cache) against ``log_prob`` (the parallel forward pass):
    log q(x) = log N(z) − log|det ∂x/∂z| for the body frame; for Cartesian frames the extended-space density of
    the flow-unit frame with its CoM, log q_flow(y) − log h(c)."""
    m = request.getfixturevalue(which)
    for block in m.flow.net.blocks:  # not the identity
        torch.nn.init.normal_(block.out.weight, std=0.05)
    density = m.density
    z = density.sample_latent(8)
    assert z.dtype == torch.float64 and density.has_latent
    log_q = density.latent_log_prob(z) - density.from_latent(z)[1]
    x = density.from_latent(z)[0]
    if which == "framed":
        torch.testing.assert_close(m.log_prob(x), log_q, rtol=0, atol=1e-8)
    else:
        y, log_det = m.flow.from_latent(z)
        torch.testing.assert_close(m.flow.net_log_prob(y) - m.flow.com_log_density(y),
                                   density.latent_log_prob(z) - log_det, rtol=0, atol=1e-8)
        torch.testing.assert_close(x, centred(y) * m.scale)
    step = 1e-3 if which == "framed" else 1e-8  # the untrained Cartesian flow puts its samples at ~1e5 kT
    out = SMCSampler(n_steps=3, langevin_steps=1, step_size=step, batch_size=16, space="latent")(
        m.proposal, m.energy, 16, generator=torch.Generator().manual_seed(0))
    assert out["x"].shape == (16, 22, 3) and torch.isfinite(out["energy_kT"]).all() and 0 < out["acceptance"] <= 1
    if which == "framed":  # the parallel forward pass is the sequential inverse's inverse
        torch.testing.assert_close(density.to_latent(x), z, rtol=0, atol=1e-8)
        both = SMCSampler(n_steps=3, langevin_steps=1, step_size=1e-7, batch_size=16, space="both",
                          latent_step_size=1e-3)(m.proposal, m.energy, 16, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(both["energy_kT"]).all() and 0 < both["acceptance_latent"] <= 1
    else:  # its particles carry a CoM the latent map of centred frames cannot give back
        assert not density.has_to_latent
        with pytest.raises(ValueError, match="cannot map its particles"):
            SMCSampler(space="both", latent_step_size=1e-3)(m.proposal, m.energy, 4)
