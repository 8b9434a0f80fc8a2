"""Shared fixtures: small real systems and short real MD (seconds on 2 cores)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

# One torch thread in every test process. `make test` runs one pytest-xdist worker per core, whose thread pools
# would otherwise fight over the same two cores (and so would the `bg` subprocesses they start); and the ranks
# that tests/test_ddp.py forks hang if their parent ever ran OpenMP with more threads (torch_threads_unchanged).
# Set before torch loads its OpenMP runtime, which reads the variable once.
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

from bg.systems import MDSettings, aldp, load_md, simulate  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def torch_threads_unchanged():
    """Fail a test that leaves torch's thread count changed (and restore it). Once a parallel region has run with
    two threads, the worker's GNU OpenMP keeps a thread pool, and the ranks that tests/test_ddp.py forks from the
    same worker hang in their first parallel region (2026-12-05: bench/cnf_solvers.main() set 2 threads and the
    next DDP test in that worker hung in libgomp)."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"this test changed torch's thread count from {before} to {after}: a forked DDP rank started from "
                    "this worker later hangs in OpenMP; set the thread count only under `if __name__ == '__main__'`")


def predicted_folder(output: str) -> Path:
    """The folder of its own that a `bg predict` printed (``wrote N samples to <folder>/samples.dcd``)."""
    found = re.findall(r"samples to (\S+)/samples[\w]*\.\w+", output)
    assert found, output
    return Path(found[-1])


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data is optional; these tests use the real PDB structures there)")
    return path


@pytest.fixture(scope="session")
def aldp_system():
    return aldp()


@pytest.fixture(scope="session")
def aldp_md_dir(tmp_path_factory, aldp_system):
    out = tmp_path_factory.mktemp("aldp_md")
    simulate(aldp_system, out, MDSettings(n_frames=200, steps_per_frame=250, equilibration_steps=2000, chunk_frames=100),
             progress=False)
    return out


@pytest.fixture(scope="session")
def aldp_frames(aldp_md_dir):
    """200 frames (50 ps) of alanine dipeptide MD, float64 nm."""
    return load_md(aldp_md_dir).xyz.astype(np.float64)


@pytest.fixture(scope="session")
def protein_md_dir(tmp_path_factory):
    """Villin headpiece 1VII from ../shared/data (596 atoms with H, minimised), or a capped tripeptide
    (ACE-AAA-NME) when the shared folder is absent, and 12 frames of short local MD written by bg."""
    from bg.systems import build_capped_peptide, load_pdb

    from filelock import FileLock

    villin = SHARED_DATA / "villin_1vii.pdb"
    system = load_pdb(villin) if villin.exists() else build_capped_peptide("AAA")
    # ~30 s of set-up: made once per test run, also when pytest-xdist workers share it (their base
    # temporary folders have a common parent); a second caller finds the finished run and returns at once.
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    out = root / "protein_md"
    with FileLock(str(root / "protein_md.lock")):
        simulate(system, out, MDSettings(n_frames=12, steps_per_frame=20, equilibration_steps=50, chunk_frames=12),
                 progress=False)
    return system, out


@pytest.fixture(scope="session")
def villin_md(protein_md_dir):
    """Villin and its first 6 MD frames (float64 nm); skipped without ../shared/data."""
    shared_file("villin_1vii.pdb")
    system, out = protein_md_dir
    return system, load_md(out).xyz[:6].astype(np.float64)


@pytest.fixture(scope="session")
def aldp_data_args(aldp_md_dir):
    """MDDataModule arguments for the short alanine dipeptide MD above (topology + trajectories)."""
    return dict(topology=str(aldp_md_dir / "topology.pdb"), trajectories=[str(aldp_md_dir / "chunks" / "*.dcd")],
                forcefield="amber99sbildn-obc", split=(0.7, 0.15, 0.15))


TINY_NSF = dict(reduced=False, backbone_layers=2, sidechain_layers=2, bins=6, width=16, depth=1, attention_dim=8,
                w2_batch_size=32, kl_batch_size=32, sample_batch_size=64)


@pytest.fixture(scope="session")
def tiny_nsf_kwargs():
    """A small split-channel NSF (seconds per epoch on 2 cores)."""
    return dict(TINY_NSF)


TINY_PEPTIDE_MD = dict(n_frames=12, steps_per_frame=10, equilibration_steps=20, chunk_frames=6, seed=3)


@pytest.fixture(scope="session")
def tiny_peptide_set(tmp_path_factory):
    """A peptide set of three capped peptides (G, A train; S test), 12 frames of MD each: (cache, spec file,
    manifest)."""
    import yaml

    from bg.systems.peptide_set import PeptideSet, make_peptide_set

    cache = tmp_path_factory.mktemp("peptides")
    spec = dict(name="tiny", kind="list", sequences=["G", "A", "S"], n_test=1, test=["S"])
    path = cache / "tiny.yaml"
    path.write_text(yaml.safe_dump({**spec, "md": TINY_PEPTIDE_MD}))
    manifest = make_peptide_set(PeptideSet.from_dict(spec), cache, MDSettings(**TINY_PEPTIDE_MD), workers=2,
                                progress=False)
    return cache, path, manifest


def peptide_fit_overrides(tmp_path: Path, tiny_set, loss: dict, model: dict, n_samples: int, **trainer) -> Path:
    """A config (written to ``tmp_path/small.yaml``) that shrinks a transferable-generator recipe to 2 epochs of
    2 steps on the tiny peptide set: CSV logs in ``tmp_path/logs/run``, checkpoints in ``tmp_path/ckpt``,
    ``MoleculeEvaluation`` of the test peptide with ``n_samples`` at the end, samples in ``tmp_path/samples``."""
    import yaml

    cache, spec, _ = tiny_set
    trainer = dict(max_epochs=2, limit_train_batches=2, enable_progress_bar=False, log_every_n_steps=1, **trainer,
                   logger=dict(class_path="lightning.pytorch.loggers.CSVLogger",
                               init_args=dict(save_dir=str(tmp_path / "logs"), name="", version="run")),
                   callbacks=[dict(class_path="callbacks.MoleculeEvaluation",
                                   init_args=dict(every_n_epochs=2, n_samples=n_samples, split="test")),
                              dict(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                                   init_args=dict(dirpath=str(tmp_path / "ckpt"), save_last=True)),
                              dict(class_path="callbacks.SampleWriter",
                                   init_args=dict(output_dir=str(tmp_path / "samples")))])
    data = dict(init_args=dict(peptide_set=str(spec), cache_dir=str(cache), batch_size=4, stride=1))
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(dict(trainer=trainer, loss=loss, model=model, data=data), sort_keys=False))
    return small
