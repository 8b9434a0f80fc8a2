import os
import signal
import subprocess
import sys
import time

import mdtraj as md
import numpy as np
import pytest

from bg.systems import MDSettings, load_md, simulate, trajectory_files

SETTINGS = dict(n_frames=60, steps_per_frame=100, equilibration_steps=500, chunk_frames=10, seed=7)


def test_md_output_is_mdtraj_readable(aldp_md_dir, aldp_system):
    files = trajectory_files(aldp_md_dir)
    assert len(files) == 2
    traj = md.load([str(f) for f in files], top=str(aldp_md_dir / "topology.pdb"))
    assert traj.n_frames == 200 and traj.n_atoms == 22
    assert np.isfinite(traj.xyz).all()
    # The molecule stays intact: every bond length within 0.08–0.2 nm.
    bonds = np.array([[b.atom1.index, b.atom2.index] for b in traj.topology.bonds])
    d = md.compute_distances(traj, bonds)
    assert d.min() > 0.08 and d.max() < 0.2


def test_killed_run_resumes_without_losing_frames(tmp_path, aldp_system):
    reference = tmp_path / "ref"
    simulate(aldp_system, reference, MDSettings(**SETTINGS), progress=False)
    killed = tmp_path / "killed"
    code = (
        "import sys; from bg.systems import aldp, simulate, MDSettings; "
        f"simulate(aldp(), sys.argv[1], MDSettings(**{SETTINGS!r}), progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(killed)], start_new_session=True)
    deadline = time.time() + 120
    while len(trajectory_files(killed)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(trajectory_files(killed))
    assert 2 <= n_before < 6, "the run should have been killed part-way"
    simulate(aldp_system, killed, MDSettings(**SETTINGS), progress=False)
    a, b = load_md(reference), load_md(killed)
    assert a.n_frames == b.n_frames == 60
    # Per-chunk seeding makes the resumed run identical on the deterministic Reference platform.
    np.testing.assert_allclose(a.xyz, b.xyz, atol=1e-5)


def test_resume_with_other_settings_is_an_error(tmp_path, aldp_system):
    simulate(aldp_system, tmp_path, MDSettings(n_frames=5, steps_per_frame=10, equilibration_steps=0, chunk_frames=5),
             progress=False)
    with pytest.raises(ValueError, match=r"other settings \(n_frames: 5 here, 6 asked"):
        simulate(aldp_system, tmp_path, MDSettings(n_frames=6, steps_per_frame=10, equilibration_steps=0), progress=False)
    # where and on how many threads it runs changes no physics: the finished run is taken as it is
    same = MDSettings(n_frames=5, steps_per_frame=10, equilibration_steps=0, chunk_frames=5, threads=1, platform="CPU")
    simulate(aldp_system, tmp_path, same, progress=False)


def test_bad_settings():
    with pytest.raises(ValueError, match="n_frames must be positive"):
        MDSettings(n_frames=0)
    from bg.systems.simulate import choose_platform

    with pytest.raises(ValueError, match="platform 'Quantum' is not available"):
        choose_platform(10, "Quantum")


def test_auto_platform_avoids_reference_for_custom_gb_forces():
    # amber14's implicit/obc2.xml is a CustomGBForce: ~5× slower on Reference than on one CPU thread
    from bg.systems import build_capped_peptide
    from bg.systems.simulate import choose_platform

    for forcefield, expected in (("amber14-obc2", "CPU"), ("amber99sbildn-obc", "Reference")):
        system = build_capped_peptide("A", forcefield=forcefield, minimize=False)
        platform, _ = choose_platform(system.n_atoms, "auto", 1, system.create_openmm_system())
        assert platform.getName() == expected, forcefield
    assert choose_platform(22)[0].getName() == "Reference"  # without the system: by size alone
