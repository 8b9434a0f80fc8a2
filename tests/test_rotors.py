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
