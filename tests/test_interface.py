"""The generator interface: the Cartesian density, proposals and samplers, old checkpoints, choices,
evaluation without a Trainer."""

import math

import lightning as L
import numpy as np
import pytest
import torch

import bg
from bg.checkpointing import upgrade_state_dict
from bg.choices import check_choices
from bg.coordinates import CartesianCoordinates
from bg.evaluation import Reference, evaluate
from bg.flows import CartesianDensity, CartesianTarFlow, Flow
from bg.models import EquivariantCNF, SplitChannelNSF, TarFlowGenerator
from bg.sampling import MALA, ImportanceSampler, Particles, SMCSampler, kish_ess
from bg.sampling.ess import ess_from_log_sums
from bg.systems import build_capped_peptide
from datamodules import MDDataModule


@pytest.fixture(scope="module")
def frames(aldp_frames):
    return torch.as_tensor(aldp_frames)


def test_density_sample_and_log_prob_agree_and_rsample_is_differentiable(aldp_system, frames):
    torch.manual_seed(0)
    flow = CartesianTarFlow(22, channels=16, blocks=2, layers=1, heads=2)
    for block in flow.net.blocks:  # not the identity
        torch.nn.init.normal_(block.out.weight, std=0.05)
    density = CartesianDensity(CartesianCoordinates(22), flow).fit(frames).double()
    rms = float((frames - frames.mean(1, keepdim=True)).square().mean().sqrt())
    assert float(density.representation.scale) == pytest.approx(rms)
    x, log_q = density.rsample(8)
    assert x.requires_grad and log_q.requires_grad and x.shape == (8, 22, 3)
    # centred samples; the density of a sample evaluated at its own (zero) CoM under the Gaussian h equals
    # its log q whenever the sampled CoM is 0, which differs from the sampled one only through h
    assert x.mean(1).abs().max() < 1e-12
    torch.manual_seed(1)
    a = density.sample(10, batch_size=3)
    torch.manual_seed(1)
    b = density.sample(10, batch_size=3)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="not conditioned on the molecule"):
        density.log_prob(x, context="AA")


def test_a_non_reparameterised_flow_refuses_rsample_and_smc(aldp_system, frames):
    torch.manual_seed(0)
    model = EquivariantCNF(hidden=4, layers=1, solver="euler", steps=2)
    model.build(aldp_system, frames)
    with pytest.raises(RuntimeError, match="no reparameterised samples"):
        model.density.rsample(2)
    assert not model.proposal.differentiable
    with pytest.raises(ValueError, match="does not support SMC"):
        SMCSampler(n_steps=1)(model.proposal, model.energy, 2)


def test_the_flow_base_declares_the_interface():
    flow = Flow()
    with pytest.raises(NotImplementedError):
        flow.sample(1)
    with pytest.raises(NotImplementedError):
        flow.log_prob(torch.zeros(1, 3))
    assert flow.fit(torch.zeros(1, 3)) is flow and Flow.reparameterized and not Flow.conditional


def test_choices_are_checked_from_their_literal_declaration():
    with pytest.raises(ValueError, match=r"model.tokens must be one of atom, coordinate, got 'residue'"):
        TarFlowGenerator(tokens="residue")
    with pytest.raises(ValueError, match="model.optimizer must be one of adamw, adam"):
        SplitChannelNSF(optimizer="sgd")
    with pytest.raises(ValueError, match="model.energy_backend must be one of"):
        SplitChannelNSF(energy_backend="jax")
    check_choices(TarFlowGenerator.__init__, dict(tokens="atom", scale=None))  # passes


def test_upgrade_state_dict_renames_prefixes_once():
    old = {"flow.blocks.0.w": 1, "representation.scale": 2, "density.flow.x": 3, "pairs": 4}
    new = upgrade_state_dict(old, {"flow.": "density.flow.net.", "representation.": "density.representation."})
    assert new == {"density.flow.net.blocks.0.w": 1, "density.representation.scale": 2, "density.flow.x": 3, "pairs": 4}


def _old_layout(path, renames):
    """Rewrite a checkpoint into the layout written before the density existed (format 1)."""
    ckpt = torch.load(path, weights_only=False)
    back = {new: old for old, new in renames.items()}
    ckpt["state_dict"] = upgrade_state_dict(ckpt["state_dict"], back)
    del ckpt["bg_format"]
    torch.save(ckpt, path)


@pytest.mark.parametrize("cls,kwargs", [(SplitChannelNSF, dict(reduced=False, backbone_layers=2, sidechain_layers=1,
                                                                width=8, attention_dim=4)),
                                        (TarFlowGenerator, dict(channels=8, blocks=2, layers=1, heads=2))])
def test_checkpoints_of_the_old_layout_load_to_the_same_density(cls, kwargs, aldp_data_args, tmp_path, frames):
    torch.manual_seed(0)
    model = cls(**kwargs, sample_batch_size=16)
    dm = MDDataModule(**dict(aldp_data_args, batch_size=32))
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    _old_layout(path, cls.key_renames)
    assert not any(k.startswith("density.") for k in torch.load(path, weights_only=False)["state_dict"])
    loaded = bg.load_generator(path).double()
    model = model.double().eval()
    x = frames[:6]
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x), rtol=0, atol=1e-10)
        torch.manual_seed(5)
        a = loaded.sample(4)
        torch.manual_seed(5)
        b = model.sample(4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_mala_kernel_leaves_a_gaussian_invariant():
    # exp(−|x|²/2) at t = 1 with E1 = |x|²/2: MALA from exact samples keeps mean 0 and variance 1
    gen = torch.Generator().manual_seed(0)

    def evaluate(x):
        return torch.zeros(len(x), dtype=torch.float64), 0.5 * x.square().sum(1), torch.zeros_like(x), x

    x = torch.randn(20000, 2, generator=gen, dtype=torch.float64)
    p = Particles(x, *evaluate(x))
    kernel, accepted = MALA(0.5), 0
    for _ in range(20):
        p, k = kernel.step(p, 1.0, evaluate, gen)
        accepted += k
    assert 0.5 < accepted / (20 * 20000) < 1.0
    assert abs(float(p.x.mean())) < 0.03 and abs(float(p.x.var()) - 1.0) < 0.05


def test_one_ess_definition():
    log_w = torch.tensor([0.0, math.log(2.0), -math.inf, math.nan], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(kish_ess(log_w), w.sum() ** 2 / (4 * w.square().sum()))
    assert float(ess_from_log_sums(torch.tensor(-math.inf), torch.tensor(-math.inf), 3)) == 0.0


def test_evaluate_without_a_trainer_matches_the_importance_sampler(aldp_system, frames):
    torch.manual_seed(0)
    model = TarFlowGenerator(channels=8, blocks=2, layers=1, heads=2, sample_batch_size=32)
    model.build(aldp_system, frames)
    ref = Reference.from_frames(frames[100:], model.topology, model.energy)
    values = evaluate(model.proposal, model.energy, ref, n=64, seed=3)
    torch.manual_seed(3)
    out = ImportanceSampler()(model.proposal, model.energy, 64)
    assert values["ess"] == pytest.approx(out["ess"], rel=1e-9)
    for key in ("energy_w2", "energy_w2_reweighted", "torsion_w2", "distance_distortion", "basin_alpha_R_reweighted"):
        assert math.isfinite(values[key]), key
    smc = evaluate(model.proposal, model.energy, ref, n=16, seed=3,
                   sampler=SMCSampler(n_steps=2, step_size=1e-7, batch_size=16))
    assert 0 < smc["smc_ancestor_fraction"] <= 1 and math.isfinite(smc["smc_energy_w2"])


def test_checkpoints_made_before_rigid_rings_load_with_the_rings_they_had(tmp_path):
    # Phe's ring: a reduced NSF saved without the `rigid_rings` option (made before it existed) has free ring
    # torsions, and must load with them and the same density, although today's default freezes them.
    pep = build_capped_peptide("F", minimize=False)
    rng = np.random.default_rng(0)
    frames = torch.tensor(pep.positions[None] + 0.005 * rng.standard_normal((8, pep.n_atoms, 3)))
    kwargs = dict(backbone_layers=2, sidechain_layers=1, width=8, attention_dim=4)
    old, new = SplitChannelNSF(rigid_rings=False, **kwargs), SplitChannelNSF(**kwargs)
    for m in (old, new):
        m.build(pep, frames)
    assert new.representation.dim < old.representation.dim
    ckpt = {"state_dict": old.state_dict(), "pytorch-lightning_version": L.__version__,
            "hyper_parameters": {k: v for k, v in old.hparams.items() if k != "rigid_rings"}}
    old.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "old.ckpt")
    loaded = bg.load_generator(tmp_path / "old.ckpt").double()
    assert loaded.representation.dim == old.representation.dim and loaded.hparams.rigid_rings is False
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(frames), old.double().eval().log_prob(frames), rtol=0, atol=1e-10)
