"""Write generated samples (``lightning predict``) as a trajectory plus their weights.

Files in ``output_dir``: ``topology.pdb``, ``samples.<format>`` (any format mdtraj writes by
extension: dcd, xtc, pdb, ...) and ``samples.npz`` with ``log_q`` (Cartesian log density),
``energy_kT`` (reduced energy u) and ``log_w = −u − log_q`` (log importance weights), one entry per
frame. Under DDP every rank writes its own files with a ``_rank<r>`` suffix.

Load them with ``mdtraj.load("samples.dcd", top="topology.pdb")`` and ``numpy.load("samples.npz")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import mdtraj as md
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from bg.metrics import kish_ess


class SampleWriter(BasePredictionWriter):
    """Write the samples of ``predict`` (see module docstring).

    Args:
        output_dir: directory for the files (created).
        format: trajectory file extension understood by mdtraj.
    """

    def __init__(self, output_dir: str = "samples", format: str = "dcd"):
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)
        self.format = format.lstrip(".")
        self.written: list[Path] = []

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: list[Any],
                           batch_indices: list[Any] | None) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        out = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        top_path = self.output_dir / "topology.pdb"
        traj = md.Trajectory(out["x"].float().numpy(), pl_module.topology)
        if trainer.is_global_zero:
            traj[:1].save_pdb(str(top_path))
        traj_path = self.output_dir / f"samples{suffix}.{self.format}"
        traj.save(str(traj_path))
        npz_path = self.output_dir / f"samples{suffix}.npz"
        np.savez(npz_path, **{k: out[k].double().numpy() for k in ("log_q", "energy_kT", "log_w")})
        self.written = [top_path, traj_path, npz_path]
        ess = float(kish_ess(out["log_w"].double()))
        print(f"wrote {len(traj)} samples to {traj_path} (+ {npz_path.name}, {top_path.name}); "
              f"ESS/n = {ess:.3f} on this rank")

