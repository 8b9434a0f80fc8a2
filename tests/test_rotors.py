"""Rotor turns (methyl / NH3+ hydrogens relabelled cyclically): the groups found, the permutation made, the
energy unchanged by OpenMM's count, and the training step that uses them."""

import pytest
import torch

from bg.coordinates import rotor_groups, turn_rotors
from bg.energy import OpenMMEnergy
from bg.models import TarFlowGenerator


@pytest.fixture(scope="module")
def frames(aldp_frames):
    return torch.as_tensor(aldp_frames, dtype=torch.float64)


def test_alanine_dipeptide_has_its_three_methyl_groups(aldp_system):
    top = aldp_system.topology
    groups = rotor_groups(top)
    assert groups.shape == (3, 3)
    parents = set()
    for g in groups.tolist():
        assert all(top.atom(i).element.symbol == "H" for i in g)
        bonded = {b.index for h in g for a, b in top.bonds if a.index == h} | \
                 {a.index for h in g for a, b in top.bonds if b.index == h}
        assert len(bonded) == 1  # all three on one heavy atom
        parents.add((top.atom(bonded.pop()).residue.name, ))
    assert parents == {("ACE",), ("ALA",), ("NME",)}


def test_turns_are_cyclic_permutations_of_each_group_and_nothing_else(aldp_system, frames):
    groups = rotor_groups(aldp_system.topology)
    x = frames[:300]
    y = turn_rotors(x, groups, torch.Generator().manual_seed(0))
    others = torch.ones(x.shape[1], dtype=torch.bool)
    others[groups.reshape(-1)] = False
    assert torch.equal(y[:, others], x[:, others])
    counts = torch.zeros(3, dtype=torch.long)
    for g in groups:
        # each frame's group is exactly one of the three turns (never a swap of two hydrogens)
        turns = torch.stack([(y[:, g] == x[:, g[(torch.arange(3) + s) % 3]]).all(-1).all(-1) for s in range(3)])
        assert torch.equal(turns.sum(0), torch.ones(len(x), dtype=torch.long))
        counts += turns.sum(1)
    assert counts.min() > 0.25 * counts.sum()  # uniform over the turns: ~300 each of 900
    assert torch.equal(x, frames[:300])  # the input is untouched


def test_turns_leave_the_openmm_energy_unchanged(aldp_system, frames):
    energy = OpenMMEnergy(aldp_system.create_openmm_system(), aldp_system.temperature)
    x = frames[:20]
    y = turn_rotors(x, rotor_groups(aldp_system.topology), torch.Generator().manual_seed(1))
    assert not torch.equal(x, y)
    torch.testing.assert_close(energy(y), energy(x), rtol=0, atol=1e-6)


def test_training_step_learns_from_turned_frames_and_refuses_inequivalent_hydrogens(aldp_system, frames):
    torch.manual_seed(0)
    model = TarFlowGenerator(channels=16, blocks=2, layers=1, heads=2, representation="frame", augment_rotors=True)
    model.build(aldp_system, frames)
    model.double()
    seen = []
    model.log_prob = lambda x: seen.append(x) or model.density.log_prob(x)
    model.log = model.log_dict = lambda *a, **k: None
    batch = frames[:64]
    model.training_step([batch], 0)
    groups = rotor_groups(aldp_system.topology)
    assert not torch.equal(seen[0], batch)
    others = torch.ones(batch.shape[1], dtype=torch.bool)
    others[groups.reshape(-1)] = False
    assert torch.equal(seen[0][:, others], batch[:, others])
    torch.testing.assert_close(model.energy(seen[0]), model.energy(batch), rtol=0, atol=1e-6)

    # a target that tells one methyl hydrogen from the others: the turns would change it, so they are refused
    h = int(groups[0, 0])
    broken = TarFlowGenerator(channels=16, blocks=2, layers=1, heads=2, representation="frame", augment_rotors=True)
    broken.build(aldp_system, frames)
    broken.energy = lambda x: x[:, h].square().sum(-1) * 100.0
    with pytest.raises(ValueError, match="not equivalent in this force field"):
        broken.training_step([batch], 0)


def test_a_transferable_model_turns_each_peptides_own_rotors(tiny_peptide_set):
    """Each batch binds its peptide; the turns use that peptide's groups (G: the two cap methyls; A: + CB's) and
    its own torch force field, and are checked once per peptide."""
    from bg.models import BoltzmannGenerator, TransferableNSF
    from datamodules import PeptideSetDataModule

    cache, spec, _ = tiny_peptide_set
    dm = PeptideSetDataModule(str(spec), cache_dir=str(cache), batch_size=4)
    dm.setup("fit")
    torch.manual_seed(0)
    model = TransferableNSF(backbone_layers=2, sidechain_layers=2, bins=4, width=8, depth=1, attention_dim=8,
                            augment_rotors=True)
    model.fit_to_frames(dm.positions["train"])
    model.double()
    model.log = model.log_dict = lambda *a, **k: None
    seen = []
    for name, n_groups in (("G", 2), ("A", 3), ("G", 2)):
        model.bind(dm.system(name))
        model.log_prob = lambda x: seen.append(x) or model.density.log_prob(x)
        batch = dm.positions["train"][dm.molecules.index(name)][:8].double()
        loss = BoltzmannGenerator.training_step(model, [batch], 0)
        assert torch.isfinite(loss)
        groups = model._rotors[model.system.name]
        assert groups.shape == (n_groups, 3)
        assert not torch.equal(seen[-1], batch)
        others = torch.ones(batch.shape[1], dtype=torch.bool)
        others[groups.reshape(-1)] = False
        assert torch.equal(seen[-1][:, others], batch[:, others])
        torch.testing.assert_close(model.energy(seen[-1]), model.energy(batch), rtol=0, atol=1e-6)
    assert len(model._rotors) == 2  # one check per peptide
