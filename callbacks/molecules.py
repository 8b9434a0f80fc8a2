"""Sample-quality evaluation of a transferable generator, one held-out peptide at a time.

For each peptide of the DataModule's ``split`` (``val``: peptides never trained on), the callback binds
the generator to it (``pl_module.bind(system)``), draws ``n_samples`` with importance weights against that
peptide's own force field and compares them with the peptide's MD frames through ``bg.evaluation.evaluate``.
It logs every value per peptide, ``<split>/<metric>/<SEQ>`` (``ess``, ``torsion_w2``, ``torsion_w2_reweighted``,
``energy_w2``, basins for single residues, …), and their means over the peptides as ``<split>/<metric>``
(``val/ess``: the mean held-out ESS/n, what a checkpoint can monitor). It runs at the end of training epochs,
so it needs no validation loop: a set without validation peptides (``n_val: 0``, every non-test peptide
trains) can log its test peptides (``split: test``) for reading — not for choosing checkpoints by them.

Each rank draws its own ``n_samples`` (seed, step, rank), and Lightning averages the ranks' values.
The generator must offer ``bind(system)`` (``bg.models.TransferableCNF``, ``bg.models.TransferableNSF``); the DataModule ``split``,
``positions`` and ``system(sequence)`` (``datamodules.PeptideSetDataModule``).
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from bg.evaluation import Reference, evaluate, stream_seed


class MoleculeEvaluation(Callback):
    """Per-peptide ESS, torsion and energy W2 and basin populations of a transferable generator (see module
    docstring).

    Args:
        every_n_epochs: evaluate at the end of training epochs 1-based divisible by n (and the last one).
        n_samples: samples per peptide and rank.
        split: the DataModule split whose peptides are evaluated (``val`` or ``test``).
        max_molecules: at most this many of the split's peptides (in split order; ``None``: all).
        max_reference: at most this many MD frames per peptide as its reference (evenly strided).
        energy_cap: kT above a reference's highest energy at which sample energies are capped for ``energy_w2``.
        seed: base of the random streams (with step and rank).
    """

    def __init__(self, every_n_epochs: int = 1, n_samples: int = 200, split: Literal["val", "test"] = "val",
                 max_molecules: int | None = None, max_reference: int = 2000, energy_cap: float = 20.0, seed: int = 0):
        super().__init__()
        if every_n_epochs < 1 or n_samples < 1 or (max_molecules is not None and max_molecules < 1):
            raise ValueError("MoleculeEvaluation: every_n_epochs, n_samples and max_molecules must be ≥ 1")
        self.every_n_epochs, self.n_samples, self.split = every_n_epochs, n_samples, split
        self.max_molecules, self.max_reference = max_molecules, max_reference
        self.energy_cap, self.seed = energy_cap, seed
        self._refs: dict[str, Reference] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "bind"):
            raise ValueError(f"MoleculeEvaluation evaluates transferable generators (with bind()); "
                             f"{type(pl_module).__name__} is built for one molecule: use callbacks.SampleEvaluation")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or math.inf)
        if (trainer.current_epoch + 1) % self.every_n_epochs and not last:
            return
        for name, value in self.evaluate(trainer, pl_module).items():
            pl_module.log(name, value, on_epoch=True, sync_dist=True, prog_bar=name == f"{self.split}/ess")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate every peptide of the split; ``{"<split>/<metric>/<SEQ>": …, "<split>/<metric>": mean}``."""
        dm = trainer.datamodule
        sequences = list(dm.split[self.split])[: self.max_molecules]
        if not sequences:
            raise ValueError(f"MoleculeEvaluation: the peptide set has no '{self.split}' peptides")
        values: dict[str, float] = {}
        per_metric: dict[str, list[float]] = {}
        for k, seq in enumerate(sequences):
            pl_module.bind(dm.system(seq))
            ref = self._reference(seq, dm.positions[self.split][k], pl_module)
            seed = stream_seed(self.seed, trainer.global_step, trainer.global_rank * len(sequences) + k)
            for metric, value in evaluate(pl_module.proposal, pl_module.energy, ref, self.n_samples, seed=seed,
                                          energy_cap=self.energy_cap).items():
                values[f"{self.split}/{metric}/{seq}"] = value
                per_metric.setdefault(metric, []).append(value)
        for metric, vs in per_metric.items():
            finite = [v for v in vs if math.isfinite(v)]
            values[f"{self.split}/{metric}"] = sum(finite) / len(finite) if finite else math.nan
        return values

    def _reference(self, seq: str, frames: torch.Tensor, pl_module: L.LightningModule) -> Reference:
        if seq not in self._refs:
            self._refs[seq] = Reference.from_frames(frames.to(pl_module.device), pl_module.topology,
                                                    pl_module.energy, self.max_reference)
        return self._refs[seq]
