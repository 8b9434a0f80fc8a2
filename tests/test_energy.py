import math

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from bg.energy import OpenMMEnergy, RegularizedEnergy, linlog_cut
from tests.conftest import shared_file


def direct_openmm(system: openmm.System, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies (kJ/mol) and forces (kJ/mol/nm) straight from a Reference-platform Context."""
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    e, f = [], []
    for x in frames:
        ctx.setPositions(x)
        st = ctx.getState(getEnergy=True, getForces=True)
        e.append(st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        f.append(st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return np.array(e), np.array(f)


@pytest.fixture(scope="module")
def aldp_test_frames(aldp_frames):
    rng = np.random.default_rng(3)
    perturbed = aldp_frames[:8] + 0.005 * rng.standard_normal(aldp_frames[:8].shape)
    return np.concatenate([aldp_frames[::20], perturbed])


def test_energy_and_gradient_match_openmm(aldp_system, aldp_test_frames):
    omm = aldp_system.create_openmm_system()
    energy = OpenMMEnergy(omm, aldp_system.temperature)
    kT = aldp_system.kT
    e_ref, f_ref = direct_openmm(omm, aldp_test_frames)
    x = torch.tensor(aldp_test_frames, dtype=torch.float64, requires_grad=True)
    u = energy(x)
    assert u.shape == (len(aldp_test_frames),) and u.dtype == torch.float64
    np.testing.assert_allclose(u.detach().numpy(), e_ref / kT, rtol=1e-6)
    (grad,) = torch.autograd.grad(u.sum(), x)
    np.testing.assert_allclose(grad.numpy(), -f_ref / kT, rtol=1e-6, atol=1e-8)
    assert math.isclose(kT, 0.0083144626 * 300, rel_tol=1e-6)


def test_gradient_is_chained_with_upstream_gradients(aldp_system, aldp_test_frames):
    energy = OpenMMEnergy(aldp_system.create_openmm_system(), aldp_system.temperature)
    x = torch.tensor(aldp_test_frames[:4], dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    (g_weighted,) = torch.autograd.grad((weights * energy(x)).sum(), x)
    _, forces = energy.energy_and_forces(x)
    torch.testing.assert_close(g_weighted, -weights[:, None, None] * forces)


def test_float32_input_gives_float32_output(aldp_system, aldp_test_frames):
    energy = OpenMMEnergy(aldp_system.create_openmm_system(), aldp_system.temperature)
    u64 = energy(torch.tensor(aldp_test_frames, dtype=torch.float64))
    u32 = energy(torch.tensor(aldp_test_frames, dtype=torch.float32))
    assert u32.dtype == torch.float32
    assert torch.allclose(u32.double(), u64, rtol=1e-4, atol=1e-3)


def test_worker_processes_agree_with_in_process(aldp_system, aldp_test_frames):
    omm = aldp_system.create_openmm_system()
    serial = OpenMMEnergy(omm, aldp_system.temperature)
    pooled = OpenMMEnergy(omm, aldp_system.temperature, n_workers=2)
    try:
        x = torch.tensor(aldp_test_frames, dtype=torch.float64)
        u_s, f_s = serial.energy_and_forces(x)
        u_p, f_p = pooled.energy_and_forces(x)
        torch.testing.assert_close(u_p, u_s, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f_p, f_s, rtol=1e-12, atol=1e-12)
    finally:
        pooled.close()


def _kill_workers(energy):
    import os
    import signal
    import time

    pids = energy.worker_pids()
    assert pids, "the pool should be running"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)  # let the executor notice


def test_dead_worker_is_restarted_then_the_run_stops_with_a_clear_message(aldp_system, aldp_test_frames):
    omm = aldp_system.create_openmm_system()
    serial = OpenMMEnergy(omm, aldp_system.temperature)
    pooled = OpenMMEnergy(omm, aldp_system.temperature, n_workers=2, max_restarts=1)
    x = torch.tensor(aldp_test_frames, dtype=torch.float64)
    try:
        expected = serial(x)
        torch.testing.assert_close(pooled(x), expected, rtol=1e-12, atol=1e-12)
        _kill_workers(pooled)  # e.g. the OOM killer
        torch.testing.assert_close(pooled(x), expected, rtol=1e-12, atol=1e-12)
        assert pooled.restarts == 1
        _kill_workers(pooled)
        with pytest.raises(RuntimeError, match="worker process died.*max_restarts=1"):
            pooled(x)
    finally:
        pooled.close()


def test_non_finite_frames_are_reported_not_zeroed(aldp_system, aldp_test_frames):
    energy = OpenMMEnergy(aldp_system.create_openmm_system(), aldp_system.temperature)
    x = torch.tensor(aldp_test_frames[:3], dtype=torch.float64)
    x[1, 5, 0] = float("nan")
    x.requires_grad_(True)
    u = energy(x)
    assert torch.isfinite(u[[0, 2]]).all() and torch.isnan(u[1])
    assert energy.last_n_nonfinite == 1
    mask = torch.isfinite(u)
    (grad,) = torch.autograd.grad(u[mask].sum(), x)
    assert torch.isfinite(grad).all() and grad[1].abs().max() == 0


def test_bad_inputs(aldp_system):
    energy = OpenMMEnergy(aldp_system.create_openmm_system(), aldp_system.temperature)
    with pytest.raises(ValueError, match=r"shape \(batch, 22, 3\) in nm"):
        energy(torch.zeros(2, 22))
    with pytest.raises(TypeError, match="needs an openmm.System"):
        OpenMMEnergy(aldp_system, 300.0)


def test_villin_energy_matches_openmm(villin_md):
    system, frames = villin_md
    omm = system.create_openmm_system()
    e_ref, f_ref = direct_openmm(omm, frames[:2])
    x = torch.tensor(frames[:2])
    # Same platform as the reference: the bridge adds no error.
    u, forces = OpenMMEnergy(omm, system.temperature, platform="Reference").energy_and_forces(x)
    np.testing.assert_allclose(u.numpy(), e_ref / system.kT, rtol=1e-6)
    np.testing.assert_allclose(forces.numpy(), f_ref / system.kT, rtol=1e-6, atol=1e-6 * np.abs(f_ref).max() / system.kT)
    # The default above 200 atoms is the faster CPU platform, which accumulates forces in single
    # precision: ~1e-6 relative in energy (≈0.003 kT for villin), documented in README.
    fast = OpenMMEnergy(omm, system.temperature)
    assert fast.platform_name == "CPU"
    u_cpu, f_cpu = fast.energy_and_forces(x)
    np.testing.assert_allclose(u_cpu.numpy(), e_ref / system.kT, rtol=1e-5)
    assert np.abs(f_cpu.numpy() - f_ref / system.kT).max() < 1e-3 * np.abs(f_ref).max() / system.kT


def test_linlog_cut():
    u = torch.tensor([-5.0, 0.0, 999.0, 1000.0, 1001.0, 1e6, 1e12, float("inf")], dtype=torch.float64, requires_grad=True)
    r = linlog_cut(u, high=1000.0, max_value=1e4)
    torch.testing.assert_close(r[:4], u[:4])
    assert math.isclose(r[4].item(), 1000 + math.log(2.0))
    assert math.isclose(r[5].item(), 1000 + math.log1p(1e6 - 1000))
    assert torch.all(r[1:7].diff() > 0)  # order preserved
    assert r[7] == 1e4  # +inf is clamped
    assert torch.isnan(linlog_cut(torch.tensor([float("nan")]))).all()
    (g,) = torch.autograd.grad(r[:7].sum(), u)
    assert g[:4].eq(1).all() and (g[4:7] <= 0.5).all()
    with pytest.raises(ValueError, match="high < max_value"):
        linlog_cut(u, high=10.0, max_value=1.0)


def test_regularized_energy_wraps_physical_energy(aldp_system, aldp_test_frames):
    energy = OpenMMEnergy(aldp_system.create_openmm_system(), aldp_system.temperature)
    reg = RegularizedEnergy(energy, high=0.0, max_value=1e9)
    x = torch.tensor(aldp_test_frames[:2], dtype=torch.float64)
    u = energy(x)
    torch.testing.assert_close(reg(x), linlog_cut(u, 0.0, 1e9))
