"""Bonds to hydrogen held fixed (issue 20's fast protein MD): hydrogen mass repartitioning against OpenMM's own,
constrained 4 fs MD that keeps those bonds at their lengths, an energy without their terms, and internal
coordinates / an NSF that freeze them."""

import math

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from bg.coordinates import InternalCoordinates
from bg.energy import OpenMMEnergy, target_energy
from bg.models import SplitChannelNSF
from bg.systems import MDSettings, get_system, load_md, simulate
from datamodules import MDDataModule


@pytest.fixture(scope="module")
def constrained(aldp_system):
    return get_system("aldp", constraints="hbonds")


@pytest.fixture(scope="module")
def constrained_frames(tmp_path_factory, constrained):
    out = tmp_path_factory.mktemp("aldp_hbonds")
    settings = MDSettings(n_frames=40, steps_per_frame=50, timestep_fs=4.0, hydrogen_mass=4.0,
                          equilibration_steps=200, chunk_frames=20)
    simulate(constrained, out, settings, progress=False)
    return torch.as_tensor(load_md(out).xyz, dtype=torch.float64)


def test_hydrogen_masses_are_repartitioned_as_openmm_does(aldp_system):
    ours = aldp_system.create_openmm_system(hydrogen_mass=4.0)
    ff = app.ForceField(*aldp_system.forcefield)
    theirs = ff.createSystem(aldp_system.omm_topology, nonbondedMethod=app.NoCutoff, hydrogenMass=4.0 * unit.amu)
    mass = lambda s: np.array([s.getParticleMass(i).value_in_unit(unit.dalton)  # noqa: E731
                               for i in range(s.getNumParticles())])
    np.testing.assert_allclose(mass(ours), mass(theirs), rtol=0, atol=1e-9)
    before = mass(aldp_system.create_openmm_system())
    assert mass(ours).sum() == pytest.approx(before.sum(), abs=1e-9)
    hydrogens = [a.index for a in aldp_system.omm_topology.atoms() if a.element.symbol == "H"]
    assert np.allclose(mass(ours)[hydrogens], 4.0)
    with pytest.raises(ValueError, match="hydrogen_mass"):
        MDSettings(hydrogen_mass=0.5)


def test_constrained_md_keeps_bonds_to_hydrogen_and_drops_their_energy_terms(aldp_system, constrained,
                                                                            constrained_frames):
    pairs = constrained.constrained_bonds()
    elements = [a.element.symbol for a in aldp_system.omm_topology.atoms()]
    assert len(pairs) == 12 and all("H" in (elements[i], elements[j]) for i, j in pairs)
    assert aldp_system.constrained_bonds() == []
    omm = constrained.create_openmm_system()
    length = torch.tensor([omm.getConstraintParameters(k)[2].value_in_unit(unit.nanometer) for k in range(len(pairs))])
    i, j = torch.tensor(pairs).T
    x = constrained_frames
    assert torch.isfinite(x).all() and len(x) == 40
    r = (x[:, i] - x[:, j]).norm(dim=-1)
    torch.testing.assert_close(r, length.double().expand_as(r), rtol=0, atol=2e-5)  # float32 DCD, CCMA tolerance
    # the constraint lengths are the force field's bond lengths, so on constrained frames the full energy equals the
    # constrained system's (whose bond terms for these pairs are gone), by OpenMM and by the torch force field
    full = OpenMMEnergy(aldp_system.create_openmm_system(), 300.0)(x)
    torch.testing.assert_close(OpenMMEnergy(omm, 300.0)(x), full, rtol=0, atol=1e-3)
    torch.testing.assert_close(target_energy(constrained, backend="torch", compile=False)(x), full, rtol=0, atol=1e-3)
    h, heavy = (int(i[0]), int(j[0])) if elements[int(i[0])] == "H" else (int(j[0]), int(i[0]))
    away = x.clone()
    away[:, h] += 0.01 * (x[:, h] - x[:, heavy]) / r[:, :1]  # stretch one X–H bond by 0.01 nm (the H moves)
    # off the manifold the two energies differ by exactly that bond's harmonic term, k/2 (0.01 nm)² / kT
    flexible = aldp_system.create_openmm_system()  # kept: its forces live only as long as it does
    bonds = next(f for f in flexible.getForces() if isinstance(f, openmm.HarmonicBondForce))
    k = next(bonds.getBondParameters(b)[3].value_in_unit(unit.kilojoule_per_mole / unit.nanometer**2)
             for b in range(bonds.getNumBonds()) if set(bonds.getBondParameters(b)[:2]) == {h, heavy})
    kT = aldp_system.kT
    term = 0.5 * k * 0.01**2 / kT
    assert term > 1.0
    gap = OpenMMEnergy(aldp_system.create_openmm_system(), 300.0)(away) - OpenMMEnergy(omm, 300.0)(away)
    torch.testing.assert_close(gap, torch.full_like(gap, term), rtol=0, atol=1e-2)


def test_internal_coordinates_freeze_the_constrained_bonds(constrained, constrained_frames):
    x = constrained_frames
    full = InternalCoordinates(constrained.topology)
    pairs = constrained.constrained_bonds()
    rep = InternalCoordinates(constrained.topology, frozen_bonds=pairs, reference=x)
    assert rep.dim == full.dim - len(pairs) and rep.has_frozen and not rep.reduced
    table = {frozenset(e["atom_indices"]) for e in rep.coordinate_table() if e["kind"] == "bond"}
    assert not table & {frozenset(p) for p in pairs}
    z, log_det = rep(x)
    y, log_det_inv = rep.inverse(z)
    # on frames whose constrained bonds are at the frozen lengths, the round trip is exact up to a rigid motion
    d = lambda a: (a[:, :, None] - a[:, None]).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(d(y), d(x), rtol=0, atol=1e-4)
    torch.testing.assert_close(log_det_inv, -log_det)
    # and the log-det is the full transform's there (the volume of the manifold in the free coordinates)
    torch.testing.assert_close(log_det, full(x)[1], rtol=0, atol=1e-3)
    # with the reduced representation (side-chain bonds already frozen) the constrained backbone bonds go too
    reduced = InternalCoordinates(constrained.topology, reduced=True, reference=x)
    both = InternalCoordinates(constrained.topology, reduced=True, frozen_bonds=pairs, reference=x)
    free_constrained = [e for e in reduced.coordinate_table()
                        if e["kind"] == "bond" and frozenset(e["atom_indices"]) in {frozenset(p) for p in pairs}]
    assert free_constrained and both.dim == reduced.dim - len(free_constrained)
    torch.testing.assert_close(d(both.inverse(both(x)[0])[0]), d(reduced.inverse(reduced(x)[0])[0]), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="not bonds of the Z-matrix"):
        InternalCoordinates(constrained.topology, frozen_bonds=[(0, 21)])
    with pytest.raises(RuntimeError, match="fit"):
        InternalCoordinates(constrained.topology, frozen_bonds=pairs).inverse(z)


def test_an_nsf_on_a_constrained_system_samples_on_the_constraint_manifold(constrained, constrained_frames,
                                                                         tiny_nsf_kwargs):
    torch.manual_seed(0)
    model = SplitChannelNSF(**tiny_nsf_kwargs)
    model.build(constrained, constrained_frames)
    model.double()
    assert model.representation.dim == InternalCoordinates(constrained.topology).dim - 12
    with torch.no_grad():
        x, log_q = model.sample(32)
        torch.testing.assert_close(model.log_prob(x), log_q, rtol=1e-6, atol=1e-6)
    i, j = torch.tensor(constrained.constrained_bonds()).T
    r = (x[:, i] - x[:, j]).norm(dim=-1)
    ref = (constrained_frames[:, i] - constrained_frames[:, j]).norm(dim=-1).mean(0)
    torch.testing.assert_close(r, ref.expand_as(r), rtol=0, atol=1e-9)


def test_the_datamodule_keeps_constrained_data_apart(tmp_path, constrained_frames):
    plain = MDDataModule(system="aldp", cache_dir=str(tmp_path))
    held = MDDataModule(system="aldp", cache_dir=str(tmp_path), constraints="hbonds")
    assert held.system.constraints == "hbonds" and plain.system.constraints is None
    assert held.md_dir.parent.name == plain.md_dir.parent.name + "_hbonds"
    with pytest.raises(ValueError, match="constraints"):
        MDDataModule(system="aldp", constraints="allbonds")


def test_own_trajectories_must_say_the_constraints_they_ran_with(tmp_path, constrained):
    out = tmp_path / "md"
    simulate(constrained, out, MDSettings(n_frames=4, steps_per_frame=10, timestep_fs=2.0, equilibration_steps=10,
                                          chunk_frames=4), progress=False)
    files = dict(topology=str(out / "topology.pdb"), trajectories=[str(out / "chunks" / "*.dcd")])
    with pytest.raises(ValueError, match="data.constraints: hbonds"):
        MDDataModule(**files).system
    pairs = lambda s: {frozenset(p) for p in s.constrained_bonds()}  # noqa: E731
    assert pairs(MDDataModule(**files, constraints="hbonds").system) == pairs(constrained)
