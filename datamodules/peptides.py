"""Many peptides as training data, for transferable generators: the MD of a peptide set, split by sequence.

In a config::

    data:
      class_path: datamodules.PeptideSetDataModule
      init_args:
        peptide_set: configs/peptide_sets/single_residues.yaml   # made by `bg data --peptide-set` (or on first use)
        batch_mode: molecule      # every batch holds frames of one peptide; mixed: padded, with masks
        batch_size: 128

Train, val and test hold whole peptides (the set's split by sequence), so validation and test measure
peptides the model never saw. Every batch is a dict:

- ``batch_mode: molecule``: ``x`` ``(B, N_m, 3)`` nm frames of one peptide m, ``molecule`` ``(B,)`` (all m);
- ``batch_mode: mixed``: ``x`` ``(B, N_max, 3)`` zero-padded frames of any peptides, ``mask`` ``(B, N_max)``
  True on real atoms, ``molecule`` ``(B,)``.

``molecules[m]`` is the m-th peptide's sequence and ``systems[m]`` its ``MolecularSystem`` (topology, force
field: each peptide has its own target energy). In molecule mode each peptide contributes its frames'
share of the batches; the batches are shuffled across peptides each epoch (seeded, identical on resume,
sharded over DDP ranks like ``MDDataModule``'s).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from bg.choices import check_choices
from bg.quiet import quiet_c_output
from bg.systems import MDSettings, MolecularSystem, load_md, molecule_system
from bg.systems.builtin import STRUCTURE_SUFFIXES
from bg.systems.peptide_set import SPLITS, make_peptide_set, manifest_path, read_spec
from datamodules.loaders import ResumableLoader, ResumableDataModule, distributed_sampler

BatchMode = Literal["molecule", "mixed"]


class MoleculeBatches(Dataset):
    """Item i: batch i of the epoch's batches, ``(x (B, N_m, 3), molecule (B,))``, frames of one molecule.

    Each epoch every molecule's frames are permuted (seed, epoch, molecule) and cut into batches of
    ``batch_size`` (the last, short one dropped; a molecule with fewer frames gives one batch of all of
    them); the sampler shuffles the order of the batches. ``epoch`` is set by the loader before each epoch.
    """

    def __init__(self, frames: list[Tensor], batch_size: int, seed: int = 0, shuffle: bool = True,
                 ids: list[int] | None = None):
        self.frames, self.batch_size, self.seed, self.shuffle = frames, batch_size, seed, shuffle
        self.ids = list(range(len(frames))) if ids is None else ids  # the molecule index each list entry has
        self.epoch = 0
        counts = [max(1, len(f) // batch_size) if len(f) else 0 for f in frames]
        self.slots = [(m, k) for m, c in enumerate(counts) for k in range(c)]

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        m, k = self.slots[i]
        f = self.frames[m]
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_007 + m)
            order = torch.randperm(len(f), generator=g)
        else:
            order = torch.arange(len(f))
        idx = order[k * self.batch_size:(k + 1) * self.batch_size]
        return f[idx], torch.full((len(idx),), self.ids[m], dtype=torch.long)


class PaddedFrames(Dataset):
    """Item i: frame i of all molecules' frames, zero-padded to ``n_max`` atoms: ``(x, mask, molecule)``."""

    def __init__(self, frames: list[Tensor], n_max: int, ids: list[int] | None = None):
        self.frames, self.n_max = frames, n_max
        self.ids = list(range(len(frames))) if ids is None else ids
        self.index = [(m, j) for m, f in enumerate(frames) for j in range(len(f))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        m, j = self.index[i]
        x = self.frames[m][j]
        padded = x.new_zeros(self.n_max, 3)
        padded[: len(x)] = x
        mask = torch.zeros(self.n_max, dtype=torch.bool)
        mask[: len(x)] = True
        return padded, mask, torch.tensor(self.ids[m])


def molecule_batch(item: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """Collate of molecule mode: the dataset's item is already a batch."""
    x, molecule = item
    return {"x": x, "molecule": molecule}


def padded_batch(items: list[tuple[Tensor, Tensor, Tensor]]) -> dict[str, Tensor]:
    """Collate of mixed mode: stacked padded frames, masks and molecule indices."""
    x, mask, molecule = (torch.stack(t) for t in zip(*items))
    return {"x": x, "mask": mask, "molecule": molecule}


class _EpochLoader(ResumableLoader):
    """``ResumableLoader`` that also tells a ``MoleculeBatches`` dataset the epoch (its frame permutation)."""

    def __iter__(self):
        where = self.position() if self.position is not None else None
        if where is not None and isinstance(self.dataset, MoleculeBatches):
            self.dataset.epoch = where[0]
        return super().__iter__()


class PeptideSetDataModule(ResumableDataModule):
    """The frames of a peptide set (``bg.systems.peptide_set``), split by sequence (see module docstring).

    Args:
        peptide_set: a spec file (YAML; ``bg data --peptide-set`` makes its MD, or ``prepare_data`` on first use).
        cache_dir: where the set's MD and manifest are (and go).
        batch_mode: ``"molecule"`` (every batch one peptide) or ``"mixed"`` (padded, with masks).
        batch_size: frames per batch (per device).
        stride: keep every n-th frame of each peptide (``bg.systems.peptide_set.effective_stride`` suggests one).
        max_frames: at most this many frames per peptide (after the stride), from the start.
        workers: MD processes for ``prepare_data`` (default: one per core).
        num_workers: DataLoader workers.
        sequence: the molecule ``bg predict`` samples: a one-letter peptide sequence (capped with Ace/Nme, in the
            set's force field; any peptide, in the set or not) or a PDB file.
    """

    def __init__(self, peptide_set: str, cache_dir: str = "data", batch_mode: BatchMode = "molecule",
                 batch_size: int = 128, stride: int = 1, max_frames: int | None = None, workers: int | None = None,
                 num_workers: int = 0, sequence: str | None = None):
        super().__init__()
        check_choices(PeptideSetDataModule.__init__, dict(batch_mode=batch_mode), "data ")
        if batch_size < 1 or stride < 1 or (max_frames is not None and max_frames < 1):
            raise ValueError("data: batch_size, stride and max_frames must be ≥ 1")
        self.spec_path = peptide_set
        self.spec, self.md_settings = read_spec(peptide_set)
        self.cache_dir = Path(cache_dir)
        self.batch_mode, self.batch_size, self.stride, self.max_frames = batch_mode, batch_size, stride, max_frames
        self.workers, self.num_workers, self.sequence = workers, num_workers, sequence
        self.split = self.spec.split()
        self.molecules: list[str] = [s for key in SPLITS for s in self.split[key]]  # train first, then val, test
        self._systems: dict[str, MolecularSystem] = {}
        self.positions: dict[str, list[Tensor]] = {}
        self._resume: tuple[int, int] | None = None

    # ------------------------------------------------------------------ molecules
    def molecule_index(self, sequence: str) -> int:
        return self.molecules.index(sequence.upper())

    def system(self, m: int | str) -> MolecularSystem:
        """The ``MolecularSystem`` of molecule m (index or sequence), loaded from its MD folder."""
        seq = self.molecules[m] if isinstance(m, int) else m.upper()
        if seq not in self._systems:
            folder = self.cache_dir / f"ace-{seq.lower()}-nme" / "md"
            if (folder / "system.json").exists():
                self._systems[seq] = MolecularSystem.load(folder)
            else:
                self._systems[seq] = molecule_system(seq, self.spec.temperature, self.spec.forcefield)
        return self._systems[seq]

    @property
    def systems(self) -> list[MolecularSystem]:
        return [self.system(m) for m in range(len(self.molecules))]

    def split_of(self, m: int) -> str:
        return next(k for k in SPLITS if self.molecules[m] in self.split[k])

    def description(self) -> dict:
        """The set as a transferable generator's checkpoint keeps it: name, force field, temperature and the
        sequences of each split."""
        return dict(name=self.spec.name, forcefield=self.spec.forcefield, temperature=self.spec.temperature,
                    **{key: list(self.split[key]) for key in SPLITS})

    def predict_system(self) -> MolecularSystem:
        """The ``MolecularSystem`` of ``sequence`` (what ``bg predict`` samples)."""
        if self.sequence is None:
            raise ValueError("bg predict of a transferable generator needs the molecule: --data.sequence SEQ (one-letter "
                             f"codes, capped with Ace/Nme) or a PDB file; this set's test peptides: "
                             f"{', '.join(self.split['test']) or 'none'}")
        if Path(self.sequence).suffix.lower() in STRUCTURE_SUFFIXES:
            return molecule_system(self.sequence, self.spec.temperature, self.spec.forcefield)
        return self.system(self.sequence)  # a sequence of the set keeps the system its MD ran with

    def _predicting(self) -> bool:
        return self.trainer is not None and self.trainer.state.fn == "predict"

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """MD of every peptide not made yet (rank 0 only under DDP); resumes. Not for ``predict``: sampling needs
        the checkpoint and the molecule only."""
        if self._predicting():
            return
        make_peptide_set(self.spec, self.cache_dir, self.md_settings, workers=self.workers)

    def setup(self, stage: str | None = None) -> None:
        if self.positions or stage == "predict":
            return
        path = manifest_path(self.cache_dir, self.spec.name)
        if not path.exists():
            raise FileNotFoundError(f"{path}: the peptide set's MD is not made; run `bg data --peptide-set "
                                    f"{self.spec_path}` (or prepare_data()) first")
        for key in SPLITS:
            frames = []
            for seq in self.split[key]:
                folder = self.cache_dir / f"ace-{seq.lower()}-nme" / "md"
                with quiet_c_output():
                    xyz = load_md(folder, stride=self.stride).xyz
                if self.max_frames is not None:
                    xyz = xyz[: self.max_frames]
                frames.append(torch.from_numpy(np.ascontiguousarray(xyz, dtype=np.float32)))
            self.positions[key] = frames
        if not any(len(f) for f in self.positions["train"]):
            raise ValueError(f"data: the peptide set {self.spec.name!r} has no training frames")

    @property
    def n_max(self) -> int:
        return max(f.shape[1] for fs in self.positions.values() for f in fs)

    def _dataset(self, key: str, shuffle: bool) -> Dataset:
        if not self.positions:
            self.setup()
        frames = self.positions[key]
        ids = [self.molecule_index(s) for s in self.split[key]]
        if self.batch_mode == "molecule":
            return MoleculeBatches(frames, self.batch_size, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
                                   shuffle=shuffle, ids=ids)
        return PaddedFrames(frames, self.n_max, ids)

    def _loader(self, key: str, train: bool) -> ResumableLoader:
        ds = self._dataset(key, shuffle=train)
        sampler = distributed_sampler(ds, shuffle=train)
        batch = dict(batch_size=None) if self.batch_mode == "molecule" else dict(batch_size=self.batch_size,
                                                                                   drop_last=train)
        return _EpochLoader(ds, sampler=sampler, num_workers=self.num_workers,
                            position=self._train_position if train else None,
                            collate_fn=molecule_batch if self.batch_mode == "molecule" else padded_batch, **batch)

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val", train=False)

    def test_dataloader(self):
        return self._loader("test", train=False)

    def summary(self) -> str:
        """Peptides and frames per split."""
        if not self.positions:
            self.setup()
        parts = []
        for key in SPLITS:
            n = sum(len(f) for f in self.positions[key])
            parts.append(f"{key} {len(self.split[key])} peptides / {n} frames")
        batches = len(self._dataset("train", True))
        per_epoch = batches if self.batch_mode == "molecule" else math.floor(batches / self.batch_size)
        return f"peptide set {self.spec.name}: " + ", ".join(parts) + f"; {per_epoch} training batches per epoch"
