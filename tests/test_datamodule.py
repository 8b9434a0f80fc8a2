import shutil

import mdtraj as md
import numpy as np
import pytest
import torch

from bg.coordinates import InternalCoordinates
from bg.systems import MDSettings
from datamodules import MDDataModule

SMALL_MD = MDSettings(n_frames=50, steps_per_frame=50, equilibration_steps=100, chunk_frames=25)


@pytest.fixture()
def files(tmp_path, aldp_md_dir, aldp_system):
    """A user-style dataset: topology PDB and two trajectory files in other formats."""
    traj = md.load([str(p) for p in sorted((aldp_md_dir / "chunks").glob("chunk_*.dcd"))],
                   top=str(aldp_md_dir / "topology.pdb"))
    shutil.copy(aldp_md_dir / "topology.pdb", tmp_path / "top.pdb")
    traj[:120].save_dcd(str(tmp_path / "run1.dcd"))
    traj[120:].save_xtc(str(tmp_path / "run2.xtc"))
    return tmp_path, traj


def test_builtin_system_generates_once_and_caches(tmp_path):
    dm = MDDataModule(system="aldp", cache_dir=str(tmp_path), md=SMALL_MD, batch_size=8)
    dm.prepare_data()
    chunk = dm.md_dir / "chunks" / "chunk_00000.dcd"
    stamp = chunk.stat().st_mtime_ns
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.positions.items()} == {"train": 40, "val": 5, "test": 5}
    again = MDDataModule(system="aldp", cache_dir=str(tmp_path), md=SMALL_MD)
    again.prepare_data()
    assert chunk.stat().st_mtime_ns == stamp  # cached, not re-simulated
    batch = next(iter(dm.train_dataloader()))[0]
    assert batch.shape == (8, 22, 3) and batch.dtype == torch.float32


def test_contiguous_split_stride_and_formats(files):
    path, traj = files
    dm = MDDataModule(topology=str(path / "top.pdb"), trajectories=[str(path / "run1.dcd"), str(path / "run2.xtc")],
                      stride=2, split=(0.5, 0.25, 0.25), forcefield="amber99sbildn-obc")
    dm.setup()
    n = len(dm.positions["train"]) + len(dm.positions["val"]) + len(dm.positions["test"])
    assert n == 60 + 40
    # Contiguous blocks in file order: train is the start of run1, test the end of run2.
    np.testing.assert_allclose(dm.positions["train"][0].numpy(), traj.xyz[0], atol=1e-6)
    np.testing.assert_allclose(dm.positions["test"][-1].numpy(), traj.xyz[-2], atol=2e-3)  # xtc precision


def test_glob_patterns(files):
    path, _ = files
    dm = MDDataModule(topology=str(path / "top.pdb"), trajectories=str(path / "run*"), forcefield="amber99sbildn-obc")
    assert [p.name for p in dm.trajectory_paths()] == ["run1.dcd", "run2.xtc"]


def test_representation_is_applied_to_batches(files, aldp_system):
    path, traj = files
    dm = MDDataModule(topology=str(path / "top.pdb"), trajectories=[str(path / "run1.dcd")], batch_size=16,
                      forcefield="amber99sbildn-obc")
    dm.setup()
    ic = InternalCoordinates(dm.topology)
    dm.set_representation(ic)
    z = next(iter(dm.val_dataloader()))[0]
    assert z.shape == (12, ic.dim)
    expected, _ = ic(dm.positions["val"].double())
    torch.testing.assert_close(z, expected.float())


def test_missing_file(files):
    path, _ = files
    dm = MDDataModule(topology=str(path / "top.pdb"), trajectories=[str(path / "nope.dcd")], forcefield="amber99sbildn-obc")
    with pytest.raises(FileNotFoundError, match=r"nope\.dcd: trajectory file not found; check data.trajectories"):
        dm.setup()
    with pytest.raises(FileNotFoundError, match=r"nothing\*: no trajectory file matches"):
        MDDataModule(topology=str(path / "top.pdb"), trajectories=str(path / "nothing*")).setup()
    with pytest.raises(FileNotFoundError, match=r"gone\.pdb: topology file not found"):
        MDDataModule(topology=str(path / "gone.pdb"), trajectories=[str(path / "run1.dcd")]).setup()


def test_empty_file(files):
    path, _ = files
    (path / "empty.dcd").write_bytes(b"")
    dm = MDDataModule(topology=str(path / "top.pdb"), trajectories=[str(path / "empty.dcd")], forcefield="amber99sbildn-obc")
    with pytest.raises(ValueError, match=r"empty\.dcd: the trajectory file is empty"):
        dm.setup()


def test_atom_count_mismatch(files, tmp_path):
    path, traj = files
    traj.atom_slice(range(21))[:5].save_dcd(str(tmp_path / "short.dcd"))
    dm = MDDataModule(topology=str(path / "top.pdb"), trajectories=[str(tmp_path / "short.dcd")], forcefield="amber99sbildn-obc")
    with pytest.raises(ValueError, match=r"short\.dcd: the trajectory has 21 atoms but the topology .* has 22"):
        dm.setup()


def test_nan_frame(files, tmp_path):
    path, traj = files
    bad = traj[:10]
    bad.xyz[7, 3, 1] = np.nan
    bad.save_dcd(str(tmp_path / "nan.dcd"))
    dm = MDDataModule(topology=str(path / "top.pdb"), trajectories=[str(tmp_path / "nan.dcd")], forcefield="amber99sbildn-obc")
    with pytest.raises(ValueError, match=r"nan\.dcd: 1 frame\(s\) have non-finite coordinates \(first: frame 7\)"):
        dm.setup()


def test_unknown_residue_in_topology(files, tmp_path):
    path, _ = files
    text = (path / "top.pdb").read_text().replace("ALA", "NLE")
    (tmp_path / "nle.pdb").write_text(text)
    dm = MDDataModule(topology=str(tmp_path / "nle.pdb"), trajectories=[str(path / "run1.dcd")],
                      forcefield="amber99sbildn-obc")
    with pytest.raises(ValueError, match=r"nle\.pdb: residue NLE2 .* replace it"):
        dm.setup()


def test_bad_arguments():
    with pytest.raises(ValueError, match="give a built-in `system`"):
        MDDataModule()
    with pytest.raises(ValueError, match="split must be three"):
        MDDataModule(system="aldp", split=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="stride must be ≥ 1"):
        MDDataModule(system="aldp", stride=0)
    with pytest.raises(ValueError, match="without trajectories"):
        MDDataModule(topology="x.pdb")


def test_forcefield_travels_with_bg_md(aldp_md_dir, files):
    """bg's MD records its force field: trajectories beside the record get it, a different one is refused, and
    trajectories without a record need one named."""
    chunks = [str(aldp_md_dir / "chunks" / "chunk_*.dcd")]
    recorded = MDDataModule(topology=str(aldp_md_dir / "topology.pdb"), trajectories=chunks)
    assert recorded.system.forcefield == ("amber99sbildn.xml", "amber99_obc.xml")
    with pytest.raises(ValueError, match=r"data.forcefield amber14-obc2 .*amber99sbildn.xml \+ amber99_obc.xml, recorded"):
        MDDataModule(topology=str(aldp_md_dir / "topology.pdb"), trajectories=chunks, forcefield="amber14-obc2").system
    with pytest.raises(ValueError, match=r"data.temperature 310.0 K is not the temperature of the MD \(300"):
        MDDataModule(topology=str(aldp_md_dir / "topology.pdb"), trajectories=chunks, temperature=310.0).system
    path, _ = files  # a user's own files: no record
    with pytest.raises(ValueError, match="data.forcefield is required with your own trajectories"):
        MDDataModule(topology=str(path / "top.pdb"), trajectories=[str(path / "run1.dcd")]).system


def test_batch_larger_than_the_training_set_trains_on_all_frames(files):
    path, _ = files
    dm = MDDataModule(topology=str(path / "top.pdb"), trajectories=[str(path / "run1.dcd")], batch_size=1024,
                      forcefield="amber99sbildn-obc")
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 1 and len(batches[0][0]) == len(dm.positions["train"])
    with pytest.raises(ValueError, match="batch_size must be ≥ 1, got -5"):
        MDDataModule(system="aldp", batch_size=-5)
