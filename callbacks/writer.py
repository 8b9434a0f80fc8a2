"""Write generated samples (``lightning predict``) as a trajectory plus their weights.

Files in ``output_dir``: ``topology.pdb``, ``samples.<format>`` (any format mdtraj writes by
extension: dcd, xtc, pdb, ...) and ``samples.npz`` with one entry per frame: ``energy_kT`` (reduced
energy u), ``log_w`` (log weights: −u − log_q for proposal samples, the final SMC weights for SMC
particles) and, for proposal samples, ``log_q`` (Cartesian log density); families that check their
samples (``EquivariantCNF``) add boolean ``wrong_chirality``, ``mirrored``, ``broken_topology`` and
``valid`` (dropped samples have log_w = −inf). With a sampler
(``model.sampler``), ``samples.json`` holds its statistics: the sampler's name, ``ess`` (ESS/n),
``log_z`` and, for SMC, the ESS history, resampling times, acceptance, energy-cut rejection rate and
``n_ancestors`` (distinct proposals the final particles descend from).
Under DDP every rank writes its own files with a ``_rank<r>`` suffix (with SMC each rank's particles
are one population; combine ranks by weighting each with exp(log_z)).

Load them with ``mdtraj.load("samples.dcd", top="topology.pdb")`` and ``numpy.load("samples.npz")``.
"""

from __future__ import annotations

import json
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
        out = {k: torch.cat([b[k] for b in batches]) for k in batches[0] if isinstance(batches[0][k], torch.Tensor)}
        stats = {k: v for k, v in batches[0].items() if not isinstance(v, torch.Tensor)}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        top_path = self.output_dir / "topology.pdb"
        traj = md.Trajectory(out["x"].float().numpy(), pl_module.topology)
        if trainer.is_global_zero:
            traj[:1].save_pdb(str(top_path))
        traj_path = self.output_dir / f"samples{suffix}.{self.format}"
        traj.save(str(traj_path))
        npz_path = self.output_dir / f"samples{suffix}.npz"
        np.savez(npz_path, **{k: v.double().numpy() if v.is_floating_point() else v.numpy()
                              for k, v in out.items() if k != "x"})
        self.written = [top_path, traj_path, npz_path]
        if stats:
            json_path = self.output_dir / f"samples{suffix}.json"
            json_path.write_text(json.dumps(stats, indent=1))
            self.written.append(json_path)
        ess = float(kish_ess(out["log_w"].double()))
        what = f"{stats['sampler']} " if "sampler" in stats else ""
        print(f"wrote {len(traj)} {what}samples to {traj_path} (+ {', '.join(p.name for p in self.written if p != traj_path)}); "
              f"ESS/n = {ess:.3f} on this rank")
        if "valid" in out:
            print(f"sample checks: wrong chirality {out['wrong_chirality'].double().mean():.3f}, broken bond graph "
                  f"{out['broken_topology'].double().mean():.3f}, kept {out['valid'].double().mean():.3f} "
                  "(dropped samples have log_w = -inf)")

