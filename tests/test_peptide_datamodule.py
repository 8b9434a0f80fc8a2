"""PeptideSetDataModule: many peptides split by sequence, batches of one molecule or padded mixes, resuming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bg.systems import load_md
from datamodules import PeptideSetDataModule
from datamodules.peptides import MoleculeBatches, _EpochLoader, molecule_batch
from datamodules.loaders import distributed_sampler


@pytest.fixture(scope="module")
def frames_of(tiny_peptide_set):
    cache, _, manifest = tiny_peptide_set
    return {s: load_md(cache / e["md_dir"]).xyz for s, e in manifest["peptides"].items()}


def make(tiny_peptide_set, **kwargs) -> PeptideSetDataModule:
    cache, spec, _ = tiny_peptide_set
    dm = PeptideSetDataModule(str(spec), cache_dir=str(cache), **kwargs)
    dm.setup("fit")
    return dm


def test_splits_hold_whole_peptides(tiny_peptide_set, frames_of):
    dm = make(tiny_peptide_set)
    assert dm.molecules == ["G", "A", "S"]
    assert [dm.split_of(m) for m in range(3)] == ["train", "train", "test"]
    for key, seqs in (("train", ["G", "A"]), ("val", []), ("test", ["S"])):
        assert [f.shape for f in dm.positions[key]] == [frames_of[s].shape for s in seqs]
        for f, s in zip(dm.positions[key], seqs):
            assert np.array_equal(f.numpy(), frames_of[s])
    for m, seq in enumerate(dm.molecules):
        assert dm.system(m).n_atoms == frames_of[seq].shape[1]
        assert dm.system(seq).topology.residue(1).name == {"G": "GLY", "A": "ALA", "S": "SER"}[seq]
    assert "train 2 peptides / 24 frames" in dm.summary() and "test 1 peptides / 12 frames" in dm.summary()


def rows_of(x: np.ndarray, frames: np.ndarray) -> list[int]:
    """Index in ``frames`` of each frame of ``x`` (exact match)."""
    return [int(np.nonzero((frames == row).all(axis=(1, 2)))[0][0]) for row in x]


def test_molecule_batches_hold_one_peptide_each_and_cover_its_frames(tiny_peptide_set, frames_of):
    dm = make(tiny_peptide_set, batch_size=4)
    batches = list(dm.train_dataloader())
    assert len(batches) == 6  # 12 frames / 4 per peptide, 2 peptides
    seen = {"G": [], "A": []}
    for b in batches:
        m = int(b["molecule"][0])
        assert (b["molecule"] == m).all() and b["x"].shape == (4, frames_of[dm.molecules[m]].shape[1], 3)
        seen[dm.molecules[m]] += rows_of(b["x"].numpy(), frames_of[dm.molecules[m]])
    assert sorted(seen["G"]) == list(range(12)) and sorted(seen["A"]) == list(range(12))  # each frame once
    test = list(dm.test_dataloader())
    assert [int(b["molecule"][0]) for b in test] == [2, 2, 2]
    assert rows_of(torch.cat([b["x"] for b in test]).numpy(), frames_of["S"]) == list(range(12))  # in order


def test_epochs_reshuffle_and_resume_where_they_stopped(tiny_peptide_set):
    dm = make(tiny_peptide_set, batch_size=4)

    def epoch(e: int, skip: int = 0) -> list[torch.Tensor]:
        ds = MoleculeBatches(dm.positions["train"], 4, seed=7)
        loader = _EpochLoader(ds, batch_size=None, sampler=distributed_sampler(ds, shuffle=True),
                              collate_fn=molecule_batch, position=lambda: (e, skip))
        return [b["x"] for b in loader]

    first, again, second = epoch(1), epoch(1), epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, second))
    resumed = epoch(1, skip=2)
    assert len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(first[2:], resumed))


def test_mixed_batches_are_padded_with_masks(tiny_peptide_set, frames_of):
    dm = make(tiny_peptide_set, batch_mode="mixed", batch_size=5)
    n_max = max(f.shape[1] for f in frames_of.values())
    assert dm.n_max == n_max
    batches = list(dm.train_dataloader())
    assert len(batches) == 4  # 24 frames, drop_last
    molecules = torch.cat([b["molecule"] for b in batches])
    assert set(molecules.tolist()) == {0, 1}
    for b in batches:
        assert b["x"].shape == (5, n_max, 3) and b["mask"].shape == (5, n_max)
        for x, mask, m in zip(b["x"], b["mask"], b["molecule"]):
            frames = frames_of[dm.molecules[int(m)]]
            n = frames.shape[1]
            assert mask[:n].all() and not mask[n:].any() and (x[n:] == 0).all()
            assert len(rows_of(x[:n].numpy()[None], frames)) == 1
    val = list(dm.test_dataloader())
    assert sum(len(b["x"]) for b in val) == 12  # evaluation keeps the last, short batch


def test_a_set_not_made_yet_names_the_command(tmp_path, tiny_peptide_set):
    _, spec, _ = tiny_peptide_set
    dm = PeptideSetDataModule(str(spec), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="bg data --peptide-set"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="batch_mode"):
        PeptideSetDataModule(str(spec), batch_mode="padded")
