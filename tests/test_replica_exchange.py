"""Replica-exchange data (openmmtools): the exported frames are the target temperature's (and each hotter
state's), the report is consistent, reruns resume instead of recomputing, the DataModule splits with the
statistical gap and adds hotter states' frames to the training block when asked."""

import dataclasses
import json
import shutil

import mdtraj as md
import numpy as np
import openmm
import pytest
from openmm import unit

from bg.systems import aldp
from bg.systems.replica_exchange import (ReplicaExchangeSettings, frame_files, replica_exchange,
                                         state_frame_files, statistical_inefficiency, walker_dir)
from datamodules import MDDataModule

TINY = ReplicaExchangeSettings(n_iterations=12, steps_per_iteration=50, n_replicas=3, max_temperature=450.0,
                               equilibration_iterations=2, walkers=2, block_iterations=5)


@pytest.fixture(scope="module")
def re_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rex")
    replica_exchange(aldp(), out, TINY, progress=False)
    return out


def assert_frames_carry_the_stored_energies(re_dir, walker: int, state: int, frames: np.ndarray, iterations) -> None:
    """Independent check: OpenMM's reduced energy of each exported frame at the state's temperature equals what
    openmmtools stored for the replica that held that state at that iteration."""
    from openmmtools import multistate

    system = aldp()
    reporter = multistate.MultiStateReporter(str(walker_dir(re_dir, walker) / "storage.nc"), open_mode="r")
    try:
        state_of = np.asarray(reporter.read_replica_thermodynamic_states())
        stored = reporter.read_energies()[0]
    finally:
        reporter.close()
    context = openmm.Context(system.create_openmm_system(), openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    kT = unit.MOLAR_GAS_CONSTANT_R * TINY.temperatures(system.temperature)[state] * unit.kelvin
    for i in iterations:
        it = TINY.equilibration_iterations + 1 + i
        replica = int(np.nonzero(state_of[it] == state)[0][0])
        context.setPositions(frames[i].astype(np.float64) * unit.nanometer)
        u = context.getState(getEnergy=True).getPotentialEnergy() / kT
        assert u == pytest.approx(float(stored[it][replica, state]), abs=2e-3)  # DCD stores float32 positions


def test_frames_are_the_target_temperature_states_energies(re_dir):
    system = aldp()
    files = frame_files(re_dir)
    assert [f.name for f in files] == ["walker_00.dcd", "walker_01.dcd"]
    frames = md.load(str(files[0]), top=system.topology).xyz
    assert frames.shape == (TINY.n_iterations, system.n_atoms, 3)
    assert_frames_carry_the_stored_energies(re_dir, 0, 0, frames, (0, 5, TINY.n_iterations - 1))


def test_hotter_states_frames_match_openmmtools_energies_and_export_lazily(re_dir, tmp_path):
    system = aldp()
    files = state_frame_files(re_dir, 2)
    assert [f.parent.name for f in files] == ["state_2", "state_2"]
    frames = md.load(str(files[1]), top=system.topology).xyz
    assert frames.shape == (TINY.n_iterations, system.n_atoms, 3)
    assert_frames_carry_the_stored_energies(re_dir, 1, 2, frames, (0, TINY.n_iterations - 1))  # 450 K
    # a run whose hotter states were never exported (made before they were) gets them from its storage
    shutil.copytree(re_dir, tmp_path / "rex")
    for d in (tmp_path / "rex" / "frames").glob("state_*"):
        shutil.rmtree(d)
    again = state_frame_files(tmp_path / "rex", 2)
    np.testing.assert_array_equal(md.load(str(again[1]), top=system.topology).xyz, frames)
    assert state_frame_files(re_dir, 0) == frame_files(re_dir)
    with pytest.raises(ValueError, match="state 3 is not on the ladder of 3"):
        state_frame_files(re_dir, 3)


def test_report_and_rerun_resumes(re_dir):
    report = json.loads((re_dir / "report.json").read_text())
    assert report["target_frames"] == 2 * TINY.n_iterations
    assert np.allclose(report["temperatures_K"], np.geomspace(300.0, 450.0, 3))
    for w in report["walkers"]:
        assert len(w["phi_positive_by_temperature"]) == 3 and len(w["neighbour_acceptance"]) == 2
        assert all(0.0 <= a <= 1.0 for a in w["neighbour_acceptance"])
    assert report["statistical_inefficiency"] >= 1.0
    before = [f.stat().st_mtime_ns for f in frame_files(re_dir)]
    replica_exchange(aldp(), re_dir, TINY, progress=False)  # finished walkers are not run again
    assert [f.stat().st_mtime_ns for f in frame_files(re_dir)] == before
    with pytest.raises(ValueError, match=r"other settings \(n_iterations: 12 here, 13 asked; steps_per"):
        replica_exchange(aldp(), re_dir, ReplicaExchangeSettings(n_iterations=13, walkers=2), progress=False)


def test_more_walkers_add_independent_runs_beside_the_finished_ones(re_dir, tmp_path):
    shutil.copytree(re_dir, tmp_path / "rex")
    grown = tmp_path / "rex"
    before = [f.stat().st_mtime_ns for f in frame_files(grown)]
    replica_exchange(aldp(), grown, dataclasses.replace(TINY, walkers=3), progress=False)
    files = frame_files(grown)
    assert len(files) == 3 and [f.stat().st_mtime_ns for f in files[:2]] == before
    assert json.loads((grown / "report.json").read_text())["target_frames"] == 3 * TINY.n_iterations
    # the third walker is its own run (seed + 2), not a copy of the others
    assert not np.allclose(md.load(str(files[2]), top=str(grown / "topology.pdb")).xyz,
                           md.load(str(files[1]), top=str(grown / "topology.pdb")).xyz)
    with pytest.raises(ValueError, match="walkers: 3 here, 2 asked"):
        replica_exchange(aldp(), grown, TINY, progress=False)


def test_a_bad_ladder_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="max_temperature"):
        replica_exchange(aldp(), tmp_path, ReplicaExchangeSettings(max_temperature=250.0), progress=False)
    assert not (tmp_path / "replica_exchange.json").exists()
    with pytest.raises(ValueError, match="n_iterations must be positive"):
        ReplicaExchangeSettings(n_iterations=0)


def test_statistical_inefficiency_of_an_ar1_process():
    rho, n = 0.8, 200_000
    rng = np.random.default_rng(0)
    x = np.empty(n)
    x[0] = 0.0
    noise = rng.normal(size=n)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + noise[t]
    assert statistical_inefficiency(x) == pytest.approx((1 + rho) / (1 - rho), rel=0.1)
    assert statistical_inefficiency(np.ones(10)) == 1.0


def test_datamodule_reads_the_walkers_and_leaves_the_gap(re_dir, tmp_path):
    cache = tmp_path / "cache"
    (cache / "aldp").mkdir(parents=True)
    (cache / "aldp" / "replica_exchange").symlink_to(re_dir)
    dm = MDDataModule(system="aldp", generator="replica_exchange", replica_exchange=TINY, cache_dir=str(cache),
                      split=(0.5, 0.25, 0.25))
    dm.prepare_data()  # finished: nothing to run
    dm.setup()
    gap = dm.split_gap
    assert gap == int(np.ceil(json.loads((re_dir / "report.json").read_text())["statistical_inefficiency"]))
    n = sum(len(v) for v in dm.positions.values())
    assert n == 2 * TINY.n_iterations - 2 * gap
    every = np.concatenate([md.load(str(f), top=aldp().topology).xyz for f in frame_files(re_dir)])
    n_train = len(dm.positions["train"])
    np.testing.assert_array_equal(dm.positions["train"].numpy(), every[:n_train])
    np.testing.assert_array_equal(dm.positions["val"][0].numpy(), every[n_train + gap])
    with pytest.raises(ValueError, match="generator"):
        MDDataModule(system="aldp", generator="remd")

    # hotter states join the training block (the same iterations); validation and test stay at 300 K
    hot = MDDataModule(system="aldp", generator="replica_exchange", replica_exchange=TINY, cache_dir=str(cache),
                       split=(0.5, 0.25, 0.25), training_states=[0, 2])
    hot.setup()
    state2 = np.concatenate([md.load(str(f), top=aldp().topology).xyz for f in state_frame_files(re_dir, 2)])
    np.testing.assert_array_equal(hot.positions["train"].numpy(), np.concatenate([every[:n_train], state2[:n_train]]))
    np.testing.assert_array_equal(hot.positions["val"].numpy(), dm.positions["val"].numpy())
    np.testing.assert_array_equal(hot.positions["test"].numpy(), dm.positions["test"].numpy())
    for bad in ([], [0, 0], [-1]):
        with pytest.raises(ValueError, match="training_states must be distinct"):
            MDDataModule(system="aldp", generator="replica_exchange", training_states=bad)
    with pytest.raises(ValueError, match="need generated replica-exchange data"):
        MDDataModule(system="aldp", generator="md", training_states=[0, 1])


def test_a_killed_run_resumes_from_the_storage(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    settings = dict(n_iterations=300, steps_per_iteration=50, n_replicas=2, max_temperature=400.0,
                    equilibration_iterations=0, walkers=1, block_iterations=2)
    script = ("import sys; from bg.systems import aldp; "
              "from bg.systems.replica_exchange import ReplicaExchangeSettings, replica_exchange; "
              f"replica_exchange(aldp(), sys.argv[1], ReplicaExchangeSettings(**{settings!r}), progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], start_new_session=True)
    storage = walker_dir(tmp_path, 0) / "storage.nc"
    deadline = time.time() + 120
    log = walker_dir(tmp_path, 0) / "log.txt"
    while not (storage.exists() and log.exists() and "at iteration" in log.read_text(errors="ignore")):
        assert time.time() < deadline and proc.poll() is None, "the walker did not start"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not frame_files(tmp_path), "killed before the end: no frames exported yet"
    replica_exchange(aldp(), tmp_path, ReplicaExchangeSettings(**settings), progress=False)
    frames = md.load(str(frame_files(tmp_path)[0]), top=aldp().topology)
    assert frames.n_frames == 300
    assert "resumed at iteration" in log.read_text(errors="ignore")
