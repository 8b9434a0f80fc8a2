"""SplitChannelNSF: densities, samples and loss terms against independent references."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from bg.energy import OpenMMEnergy
from bg.metrics import pairwise_distances
from bg.models import SplitChannelNSF
from datamodules import MDDataModule


@pytest.fixture(scope="module")
def built(aldp_data_args, tiny_nsf_kwargs):
    dm = MDDataModule(**aldp_data_args)
    dm.setup()
    torch.manual_seed(0)
    model = SplitChannelNSF(**tiny_nsf_kwargs)
    model.build(dm.system, dm.positions["train"])
    with torch.no_grad():  # move away from the identity so that the checks are not trivial
        for p in model.flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, dm


def test_sample_log_q_equals_log_prob_of_sample(built):
    model, _ = built
    torch.manual_seed(1)
    x, log_q = model.sample(64)
    assert x.shape == (64, 22, 3) and log_q.shape == (64,)
    # Independent path: Cartesian → internal coordinates → flow density + representation log-det.
    torch.testing.assert_close(model.log_prob(x), log_q, rtol=0, atol=2e-3)


def test_energy_is_the_physical_target(built):
    model, dm = built
    x = dm.positions["val"][:8].double()
    ref = OpenMMEnergy(dm.system.create_openmm_system(), dm.system.temperature)(x)
    torch.testing.assert_close(model.energy(x), ref, rtol=1e-6, atol=1e-6)


def test_w2_term_equals_assignment_w2(built):
    model, dm = built
    x = dm.positions["train"][:32]
    torch.manual_seed(3)
    value = model.term_w2(x)
    torch.manual_seed(3)
    xs, _ = model.density.rsample(32)
    gen = pairwise_distances(xs, model.pairs).detach().numpy()
    ref = pairwise_distances(x.double(), model.pairs).numpy()
    total = 0.0
    for p in range(gen.shape[1]):
        cost = (gen[:, p, None] - ref[None, :, p]) ** 2
        r, c = linear_sum_assignment(cost)
        total += cost[r, c].mean()
    assert abs(value.item() - total / gen.shape[1]) < 1e-10


def test_kl_term_equals_energy_plus_log_q(built):
    model, dm = built
    torch.manual_seed(4)
    value = model.term_kl(dm.positions["train"][:4])
    torch.manual_seed(4)
    xs, log_q = model.density.rsample(model.hparams.kl_batch_size)
    u = OpenMMEnergy(dm.system.create_openmm_system(), dm.system.temperature)(xs.detach())
    u = torch.where(u > model.energy_cut, model.energy_cut + torch.log1p(u - model.energy_cut), u)
    assert abs(value.item() - (u + log_q.detach()).mean().item()) < 1e-4 * max(1.0, abs(value.item()))


@pytest.mark.parametrize("term", ["nll", "w2", "kl"])
def test_every_term_trains_the_flow(built, term):
    model, dm = built
    model.zero_grad()
    getattr(model, f"term_{term}")(dm.positions["train"][:32]).backward()
    grads = [p.grad for p in model.flow.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_reduced_representation_and_baseline(aldp_data_args, tiny_nsf_kwargs):
    dm = MDDataModule(**aldp_data_args)
    dm.setup()
    kw = dict(tiny_nsf_kwargs, reduced=True, split_channels=False, conditioner="mlp")
    model = SplitChannelNSF(**kw)
    model.build(dm.system, dm.positions["train"])
    assert model.representation.dim < 60  # ALA side chain bonds/angles frozen
    x, log_q = model.sample(16)
    torch.testing.assert_close(model.log_prob(x), log_q, rtol=0, atol=2e-3)


def test_bad_options_are_one_line():
    with pytest.raises(ValueError, match="model.conditioner must be one of gau, mlp"):
        SplitChannelNSF(conditioner="transformer")
    with pytest.raises(ValueError, match="unknown term"):
        SplitChannelNSF(loss_weights={"nll": 1.0, "fm": 1.0})
    with pytest.raises(ValueError, match="needs an MD DataModule"):
        SplitChannelNSF().setup("fit")


def test_smc_runs_in_cartesian_space_for_the_nsf(built):
    # The default particle space of every family is Cartesian nm with E0 = −log q(x) (through the
    # internal coordinates) and E1 = u(x); at t = 0 their difference is the importance log-weight.
    from bg.sampling import SMCSampler

    model, _ = built
    torch.manual_seed(2)
    proposal = model.proposal
    x = proposal.particles(16)
    out = proposal.weigh(4, model.energy)
    target = proposal.target(model.energy)
    torch.testing.assert_close(-proposal.log_prob(out["x"]) - target(out["x"]), out["log_w"], rtol=0, atol=5e-3)
    res = SMCSampler(n_steps=3, langevin_steps=2, step_size=1e-7)(proposal, model.energy, 16,
                                                                  generator=torch.Generator().manual_seed(0))
    assert x.shape == res["x"].shape == (16, 22, 3) and torch.isfinite(res["energy_kT"]).all()
    assert 0 < res["acceptance"] <= 1 and len(res["ess_history"]) == 3


def test_latent_space_of_the_nsf_pushes_forward_its_density(built):
    # From base points u: log base(u) − log|det ∂x/∂u| must be the density the forward path (Cartesian → internal
    # coordinates → transform) gives the frame x = f(u).
    model, _ = built
    torch.manual_seed(3)
    density, flow = model.density, model.flow
    assert density.has_latent and not density.has_to_latent
    u = density.sample_latent(32)
    x, log_det = density.from_latent(u)
    torch.testing.assert_close(density.latent_log_prob(u) - log_det, model.log_prob(x), rtol=0, atol=2e-3)
    # circular coordinates are read modulo 2π: the same frame, Jacobian and base density one turn away
    turn = 2 * math.pi / flow._latent_scale() * flow.base.circular  # one turn of each torsion, in latent units
    turned = u + turn * torch.randint(-2, 3, u.shape, dtype=u.dtype)
    x2, log_det2 = density.from_latent(turned)
    torch.testing.assert_close(x2, x, rtol=0, atol=1e-4)
    torch.testing.assert_close(log_det2, log_det, rtol=0, atol=1e-3)
    torch.testing.assert_close(density.latent_log_prob(turned), density.latent_log_prob(u), rtol=0, atol=1e-6)
    # a bounded coordinate past its interval: outside the base's support
    bounded = int(torch.nonzero(~flow.base.circular)[0])
    outside = u.clone()
    outside[:4, bounded] = (flow.base.high - flow.base.loc)[bounded] / flow._latent_scale()[bounded] + 1e-3
    assert torch.isneginf(density.latent_log_prob(outside)[:4]).all()
    assert torch.isfinite(density.latent_log_prob(outside)[4:]).all()


def test_smc_in_the_nsf_latent_space_is_exact_on_its_own_density(built):
    # Target = the flow's own density: in latent space E1 − E0 = u(f(z)) − log|det| + log base(z) = 0, so every
    # path point keeps equal weights (ESS 1) and log Z = 0, whatever the moves do; a pull-back with the wrong
    # Jacobian would spread them.
    from bg.sampling import SMCSampler

    model, _ = built
    target = lambda x: -model.log_prob(x)  # noqa: E731
    sampler = SMCSampler(n_steps=4, langevin_steps=2, step_size=0.05, space="latent")
    res = sampler(model.proposal, target, 32, generator=torch.Generator().manual_seed(0))
    assert res["x"].shape == (32, 22, 3)
    assert res["ess"] > 0.999 and abs(res["log_z"]) < 0.02
    assert 0.5 < res["acceptance"] <= 1  # moves happen: latent units are the base's spreads
    with pytest.raises(ValueError, match="cannot map its particles to its flow's latent space"):
        SMCSampler(space="both", latent_step_size=1e-3)(model.proposal, target, 4)


@pytest.mark.parametrize("atoms, selection", [
    ("backbone", "not element H and (name N CA C O OXT CH3)"),
    ("polar", "not element H and (name N CA C O OXT CH3 or element N O S)"),
    ("heavy", "not element H"),
])
def test_w2_atoms_select_distance_pairs(atoms, selection):
    """The atoms whose distances ``w2`` matches, against mdtraj's selection language on a peptide with side-chain
    N, O and S (Lys, Asp, Met): every pair i < j of the selection, once."""
    from bg.analysis import distance_pairs
    from bg.systems import build_capped_peptide

    top = build_capped_peptide("KDM", minimize=False).topology
    expected = top.select(selection)
    pairs = distance_pairs(top, atoms).numpy()
    assert len(pairs) == len(expected) * (len(expected) - 1) // 2
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert set(map(tuple, pairs.tolist())) == {(int(i), int(j)) for k, i in enumerate(expected) for j in expected[k + 1:]}
    if atoms == "polar":  # the side chains' donors and acceptors are in, their carbons are not
        names = {top.atom(int(i)).name for i in expected}
        assert {"NZ", "OD1", "OD2", "SD"} <= names and not {"CB", "CE"} & names


def test_w2_uses_the_selected_pairs(aldp_data_args, tiny_nsf_kwargs):
    """``w2_atoms: heavy`` adds alanine's CB to the nine heavy backbone atoms of alanine dipeptide: 45 pairs."""
    dm = MDDataModule(**aldp_data_args)
    dm.setup()
    counts = {}
    for atoms in ("backbone", "heavy"):
        model = SplitChannelNSF(**tiny_nsf_kwargs, w2_atoms=atoms)
        model.build(dm.system, dm.positions["train"])
        counts[atoms] = len(model.pairs)
    assert counts == {"backbone": 36, "heavy": 45}
    model.use_w2_atoms("backbone")  # a built model switched, as bench/energy_stages.py --w2-atoms does
    assert len(model.pairs) == 36 and model.hparams.w2_atoms == "backbone"
    with pytest.raises(ValueError, match="w2_atoms"):
        SplitChannelNSF(**tiny_nsf_kwargs, w2_atoms="sidechain")
