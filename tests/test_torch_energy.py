"""The torch force field against OpenMM's Reference platform (float64), force by force."""

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from bg.energy import OpenMMEnergy, TorchEnergy, UnsupportedForceError, target_energy
from bg.energy.expressions import Expression, ExpressionError
from bg.systems import build_capped_peptide, load_pdb
from tests.conftest import shared_file

KJ = unit.kilojoule_per_mole


def reference(system: openmm.System, frames: np.ndarray):
    """Per-force energies (kJ/mol, one list per force), totals and forces from OpenMM Reference."""
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    for k, f in enumerate(system.getForces()):
        f.setForceGroup(k)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    per_force, total, forces = [], [], []
    for x in frames:
        ctx.setPositions(x)
        per_force.append([ctx.getState(getEnergy=True, groups={k}).getPotentialEnergy().value_in_unit(KJ)
                          for k in range(system.getNumForces())])
        st = ctx.getState(getEnergy=True, getForces=True)
        total.append(st.getPotentialEnergy().value_in_unit(KJ))
        forces.append(st.getForces(asNumpy=True).value_in_unit(KJ / unit.nanometer))
    return np.array(per_force), np.array(total), np.array(forces)


def check_against_openmm(system: openmm.System, frames: np.ndarray, temperature: float = 300.0):
    energy = TorchEnergy.from_openmm(system, temperature)
    per_force, total, forces = reference(system, frames)
    terms = energy.energy_terms(torch.tensor(frames))
    kinds = [type(f).__name__ for f in system.getForces() if not isinstance(f, openmm.CMMotionRemover)]
    assert [name.split("[")[0] for name in terms] == kinds
    cols = [k for k, f in enumerate(system.getForces()) if not isinstance(f, openmm.CMMotionRemover)]
    for (name, e), k in zip(terms.items(), cols):
        np.testing.assert_allclose(e.numpy(), per_force[:, k], rtol=1e-6, atol=1e-9, err_msg=name)
    u, f = energy.energy_and_forces(torch.tensor(frames))
    np.testing.assert_allclose(u.numpy() * energy.kT, total, rtol=1e-6)
    f_err = np.abs(f.numpy() * energy.kT - forces).max() / np.abs(forces).max()
    assert f_err < 1e-5, f"force error {f_err:.2e} relative to the largest force"
    return energy


@pytest.fixture(scope="module")
def aldp_test_frames(aldp_frames):
    rng = np.random.default_rng(11)
    return np.concatenate([aldp_frames[::25], aldp_frames[:4] + 0.01 * rng.standard_normal((4, 22, 3))])


@pytest.mark.parametrize("forcefield", ["amber99sbildn-obc", "amber14-obc2", "amber14-obc1", "amber14-vacuum",
                                        "amber99sbildn-vacuum"])
def test_alanine_dipeptide_force_fields(forcefield, aldp_system, aldp_test_frames):
    pep = build_capped_peptide("A", forcefield=forcefield, minimize=False)
    assert [a.name for a in pep.topology.atoms] == [a.name for a in aldp_system.topology.atoms]
    check_against_openmm(pep.create_openmm_system(), aldp_test_frames)


def test_salt_screening_in_custom_gb(aldp_system, aldp_test_frames):
    ff = app.ForceField("amber14-all.xml", "implicit/obc2.xml")
    omm = ff.createSystem(aldp_system.omm_topology, nonbondedMethod=app.NoCutoff,
                          implicitSolventKappa=1.0 / unit.nanometer)
    gb = next(f for f in omm.getForces() if isinstance(f, openmm.CustomGBForce))
    assert "exp(-kappa*f)" in gb.getEnergyTermParameters(2)[0] and "kappa=1;" in gb.getEnergyTermParameters(2)[0]
    check_against_openmm(omm, aldp_test_frames)


def test_reaction_field_cutoff():
    pep = build_capped_peptide("AAAAAA", forcefield="amber14-vacuum", minimize=False)
    pep.nonbonded_cutoff = 0.8  # the extended hexapeptide has pairs beyond it
    omm = pep.create_openmm_system()
    rng = np.random.default_rng(0)
    frames = pep.positions[None] + 0.005 * rng.standard_normal((3, pep.n_atoms, 3))
    assert np.linalg.norm(pep.positions[0] - pep.positions[-1]) > 0.8
    check_against_openmm(omm, frames)


def test_villin_md_frames(villin_md):
    system, frames = villin_md
    rng = np.random.default_rng(1)
    check_against_openmm(system.create_openmm_system(), np.concatenate([frames[:2], frames[:1] + 0.005 * rng.standard_normal(frames[:1].shape)]))


def test_protein_g():
    system = load_pdb(shared_file("protein_g_1pga.pdb"), minimize=False)
    rng = np.random.default_rng(2)
    frames = system.positions[None] + np.concatenate([np.zeros((1, system.n_atoms, 3)), 0.005 * rng.standard_normal((1, system.n_atoms, 3))])
    check_against_openmm(system.create_openmm_system(), frames)


def test_unsupported_forces_are_named(aldp_system):
    omm = aldp_system.create_openmm_system()
    omm.addForce(openmm.CustomBondForce("k*r^2"))
    with pytest.raises(UnsupportedForceError, match=r"CustomBondForce \(force 5\) is not supported"):
        TorchEnergy.from_openmm(omm, 300.0)
    gbn2 = app.ForceField("amber14-all.xml", "implicit/gbn2.xml").createSystem(aldp_system.omm_topology)
    with pytest.raises(UnsupportedForceError, match="tabulated functions"):
        TorchEnergy.from_openmm(gbn2, 300.0)
    cut = app.ForceField("amber99sbildn.xml", "amber99_obc.xml").createSystem(
        aldp_system.omm_topology, nonbondedMethod=app.CutoffNonPeriodic)
    with pytest.raises(UnsupportedForceError, match="GBSAOBCForce with a cutoff"):
        TorchEnergy.from_openmm(cut, 300.0)
    with pytest.raises(TypeError, match="needs an openmm.System"):
        TorchEnergy.from_openmm(aldp_system, 300.0)


def _two_stage_gb(n: int) -> openmm.CustomGBForce:
    """A CustomGBForce with exclusions, a pair value, a value chained on it, and asymmetric pair energy."""
    gb = openmm.CustomGBForce()
    gb.addPerParticleParameter("q")
    gb.addComputedValue("I", "(q2^2+0.1)*exp(-r)", openmm.CustomGBForce.ParticlePair)
    gb.addComputedValue("s", "q^2+0.5+I", openmm.CustomGBForce.SingleParticle)
    gb.addEnergyTerm("q*I", openmm.CustomGBForce.SingleParticle)
    gb.addEnergyTerm("q1*q2*s1/(r+I2)", openmm.CustomGBForce.ParticlePair)
    for i in range(n):
        gb.addParticle([0.1 * ((i % 5) - 2)])
    gb.addExclusion(0, 1)
    gb.addExclusion(2, 5)
    return gb


def test_custom_gb_chained_values_and_exclusions(aldp_system, aldp_test_frames):
    omm = openmm.System()
    for _ in range(22):
        omm.addParticle(1.0)
    omm.addForce(_two_stage_gb(22))
    check_against_openmm(omm, aldp_test_frames[:4])


def test_custom_gb_with_coordinates_is_rejected_when_read():
    omm = openmm.System()
    omm.addParticle(1.0)
    gb = openmm.CustomGBForce()
    gb.addComputedValue("s", "x^2", openmm.CustomGBForce.SingleParticle)
    gb.addEnergyTerm("s", openmm.CustomGBForce.SingleParticle)
    gb.addParticle([])
    omm.addForce(gb)
    with pytest.raises(UnsupportedForceError, match=r"uses \['x'\].*coordinates"):
        TorchEnergy.from_openmm(omm, 300.0)


def test_cm_motion_remover_is_ignored(aldp_system, aldp_test_frames):
    omm = aldp_system.create_openmm_system()
    omm.addForce(openmm.CMMotionRemover())
    energy = check_against_openmm(omm, aldp_test_frames[:3])
    assert len(energy.terms) == 5


def test_chunking_and_dtypes(aldp_system, aldp_test_frames):
    omm = aldp_system.create_openmm_system()
    whole = TorchEnergy.from_openmm(omm, 300.0)
    tiny = TorchEnergy.from_openmm(omm, 300.0, max_pair_elements=1)
    assert tiny.chunk_size == 1
    x = torch.tensor(aldp_test_frames)
    torch.testing.assert_close(tiny(x), whole(x), rtol=1e-14, atol=1e-12)
    u32 = whole(x.float())
    assert u32.dtype == torch.float32
    assert (u32.double() - whole(x)).abs().max() < 0.01  # kT; float32 accuracy is reported in bench/
    with pytest.raises(ValueError, match=r"shape \(batch, 22, 3\) in nm"):
        whole(torch.zeros(3, 21, 3))


def test_autograd_gradient_is_minus_forces(aldp_system, aldp_test_frames):
    omm = aldp_system.create_openmm_system()
    energy = TorchEnergy.from_openmm(omm, 300.0)
    x = torch.tensor(aldp_test_frames, requires_grad=True)
    (g,) = torch.autograd.grad(energy(x).sum(), x)
    _, f_openmm = OpenMMEnergy(omm, 300.0).energy_and_forces(x.detach())
    torch.testing.assert_close(-g, f_openmm, rtol=1e-6, atol=1e-6)


def test_compiled_equals_eager(aldp_system, aldp_test_frames):
    omm = aldp_system.create_openmm_system()
    x = torch.tensor(aldp_test_frames)
    eager = TorchEnergy.from_openmm(omm, 300.0)
    compiled = TorchEnergy.from_openmm(omm, 300.0, compile=True)
    u_e, f_e = eager.energy_and_forces(x)
    u_c, f_c = compiled.energy_and_forces(x)
    assert compiled.compile, "torch.compile should work on this machine (gcc is installed)"
    torch.testing.assert_close(u_c, u_e, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(f_c, f_e, rtol=1e-10, atol=1e-8)


def test_target_energy_factory(aldp_system):
    assert isinstance(target_energy(aldp_system, compile=False), TorchEnergy)
    assert isinstance(target_energy(aldp_system, backend="openmm"), OpenMMEnergy)
    omm = aldp_system.create_openmm_system()
    omm.addForce(openmm.CustomBondForce("k*r^2"))
    assert isinstance(target_energy(omm, 300.0), OpenMMEnergy)  # falls back, logged
    with pytest.raises(UnsupportedForceError):
        target_energy(omm, 300.0, backend="torch")
    with pytest.raises(ValueError, match="needs a temperature"):
        target_energy(omm)
    with pytest.raises(ValueError, match="backend must be one of"):
        target_energy(aldp_system, backend="gpu")


def test_expressions():
    e = Expression("a*L + or; L=D+1; D=abs(r-2)")  # definitions in any order, `or` is a Python keyword
    assert e.variables == {"a", "r", "or"}
    assert e(dict(a=2.0, r=0.5, **{"or": 0.25})) == 2.0 * 2.5 + 0.25
    t = Expression("select(step(x-1), x^2, -x)")(dict(x=torch.tensor([0.0, 2.0])))
    torch.testing.assert_close(t, torch.tensor([-0.0, 4.0]))
    for bad, msg in [("__import__('os')", "not supported"), ("a.b", "unsupported syntax"), ("a==b", "unsupported"),
                     ("x;=3", "cannot read the definition")]:
        with pytest.raises(ExpressionError, match=msg):
            Expression(bad)
    with pytest.raises(ExpressionError, match=r"needs values for \['y'\]"):
        Expression("x+y")(dict(x=1.0))
