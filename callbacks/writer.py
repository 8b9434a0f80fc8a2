"""Write generated samples (``lightning predict``) as a trajectory plus their weights.

Each ``predict`` writes into a folder of its own, ``<output_dir>/<date>-<time>`` (printed), so that no run
overwrites another: ``topology.pdb``, ``samples.<format>`` (any format mdtraj writes by extension: dcd,
xtc, pdb, ...) and ``samples.npz`` with one entry per frame: ``energy_kT`` (reduced
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
import time
from pathlib import Path
from typing import Any

import lightning as L
import mdtraj as md
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from bg.metrics import kish_ess
from bg.report import ess_before_resampling
from bg.sampling.smc import COLLAPSE_FRACTION, collapsed


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
        self.run_dir: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Claim a folder of this run's own, ``<output_dir>/<date>-<time>`` (rank 0 names it, every rank
        writes into it), so that no prediction overwrites an earlier one."""
        name = None
        if trainer.is_global_zero:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name, k = stamp, 1
            while (self.output_dir / name).exists():
                k += 1
                name = f"{stamp}-{k}"
            (self.output_dir / name).mkdir(parents=True)
        self.run_dir = self.output_dir / trainer.strategy.broadcast(name, src=0)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.run_dir is not None and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()  # stopped before writing: leave no empty folder behind

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: list[Any],
                           batch_indices: list[Any] | None) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        out = {k: torch.cat([b[k] for b in batches]) for k in batches[0] if isinstance(batches[0][k], torch.Tensor)}
        stats = {k: v for k, v in batches[0].items() if not isinstance(v, torch.Tensor)}
        folder = self.run_dir or self.output_dir
        folder.mkdir(parents=True, exist_ok=True)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        top_path = folder / "topology.pdb"
        traj = md.Trajectory(out["x"].float().numpy(), pl_module.topology)
        if trainer.is_global_zero:
            traj[:1].save_pdb(str(top_path))
        traj_path = folder / f"samples{suffix}.{self.format}"
        traj.save(str(traj_path))
        npz_path = folder / f"samples{suffix}.npz"
        np.savez(npz_path, **{k: v.double().numpy() if v.is_floating_point() else v.numpy()
                              for k, v in out.items() if k != "x"})
        self.written = [top_path, traj_path, npz_path]
        if stats:
            json_path = folder / f"samples{suffix}.json"
            json_path.write_text(json.dumps(stats, indent=1))
            self.written.append(json_path)
        what = f"{stats['sampler']} " if "sampler" in stats else ""
        if "n_ancestors" in stats:
            # after resampling the weights are equal by construction: their ESS says nothing about the sample
            quality = (f"ESS/n before the last resampling {ess_before_resampling(stats):.3f}; the {len(traj)} particles descend "
                       f"from {stats['n_ancestors']} distinct proposals")
            if collapsed(stats["n_ancestors"], len(traj)):
                quality += f" (fewer than {COLLAPSE_FRACTION:.0%}: the population collapsed onto a few proposals)"
        else:
            quality = f"ESS/n = {float(kish_ess(out['log_w'].double())):.3f}"
        # through the progress bar when there is one, so that the line does not run on from the bar's last line
        say = trainer.progress_bar_callback.print if trainer.progress_bar_callback is not None else print
        say(f"wrote {len(traj)} {what}samples to {traj_path} (+ {', '.join(p.name for p in self.written if p != traj_path)}); "
            f"{quality} on this rank")
        if "valid" in out:
            say(f"sample checks: wrong chirality {out['wrong_chirality'].double().mean():.3f}, broken bond graph "
                f"{out['broken_topology'].double().mean():.3f}, kept {out['valid'].double().mean():.3f} "
                "(dropped samples have log_w = -inf)")

