"""Sample-quality evaluation during training: draw samples, weigh them, compare with held-out MD.

Every ``every_n_epochs`` validation epochs the generator draws ``n_samples`` and logs, all as
torchmetrics reduced across ranks. The samples come in chunks seeded by (step, chunk index) and
dealt round-robin to the ranks, so that any number of ranks draws the same samples as one process
and logs the same values (``chunks``, ``draw``):

- ``val/ess``: Kish ESS / n of log w = −u(x) − log q(x);
- ``val/distance_distortion``: ΔD (nm), mean over heavy backbone atom pairs of |mean generated
  distance − mean reference distance|;
- ``val/energy_w2`` and ``val/energy_w2_reweighted``: 1-D 2-Wasserstein distance (kT) between
  generated (raw / importance-reweighted) and reference energies (finite samples only; generated
  energies above the highest reference energy + ``energy_cap`` count as that value, so that a few
  clashes read as a bounded penalty, not 10^12);
- ``val/torsion_w2`` and ``val/torsion_w2_reweighted``: periodic 1-D 2-Wasserstein distance (rad)
  between generated (raw / importance-reweighted) and reference φ and ψ, averaged over residues;
- ``val/finite_fraction`` and ``val/low_energy_fraction`` (energy ≤ the highest reference energy);
- for families that check their samples (``EquivariantCNF``): ``val/wrong_chirality_rate`` (before
  mirroring), ``val/broken_topology_rate`` and ``val/valid_fraction`` (not dropped; dropped samples
  count as weight zero in ``val/ess``);
- for a single-residue peptide (alanine dipeptide), ``val/basin_<name>`` and
  ``val/basin_<name>_reweighted`` populations of the φ/ψ basins (``bg.analysis.BASINS``);
- with ``smc`` set (a ``bg.sampling.SMCSampler``), the same comparison for SMC samples, side by side
  with the proposal: ``val/smc_energy_w2``, ``val/smc_torsion_w2``, ``val/smc_distance_distortion``,
  ``val/smc_basin_<name>``, and ``val/smc_ess`` (final ESS/n), ``val/smc_acceptance``,
  ``val/smc_rejection_rate``, ``val/smc_ancestor_fraction`` (distinct proposals the final particles
  descend from / particles: near 0 means the population collapsed onto a few proposals). Each rank runs its own population of ``smc_samples / ranks``
  particles (seeded by step and rank) and resamples it to equal weights at the end, so the ranks'
  samples pool like unweighted samples (a different population split changes the draws, not the
  expectations).

Figures (rank 0's samples): energy histogram (MD / generated / reweighted) and Ramachandran
free-energy maps (MD / generated / reweighted), plus W&B/TensorBoard histograms of energies and
log weights. The reference is the DataModule's ``val`` split (at most ``max_reference`` frames,
evenly strided).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torchmetrics import MeanMetric

from bg import plots
from bg.analysis import BASINS, backbone_pairs, basin_index, phi_psi_atoms, torsions
from bg.metrics import DistanceDistortion, EffectiveSampleSize, Wasserstein1D, WeightedFraction, pairwise_distances
from bg.sampling import SMCSampler, systematic_resample
from callbacks.figures import log_figure, log_histogram


class SampleEvaluation(Callback):
    """Evaluate generated samples against held-out MD (see module docstring).

    Args:
        every_n_epochs: evaluate on validation runs at the end of epochs 1-based divisible by n (and at
            the last epoch); combine with ``trainer.check_val_every_n_epoch``.
        n_samples: samples per evaluation, over all ranks.
        batch_size: sampling batch size (default: the module's ``sample_batch_size``).
        reference: DataModule split used as reference (``val`` or ``test``).
        max_reference: at most this many reference frames.
        figures: log energy histograms and Ramachandran plots.
        figures_every_n_evals: figures on every n-th evaluation only (they cost a second or two).
        energy_cap: kT above the highest reference energy at which generated energies are capped
            for ``val/energy_w2``.
        smc: also run this SMC sampler from fresh proposal samples and log its metrics (``val/smc_*``).
        smc_samples: SMC particles per evaluation, over all ranks.
        smc_every_n_evals: SMC on every n-th evaluation only (it costs n_steps × langevin_steps gradient
            evaluations of the flow and the energy).
    """

    def __init__(self, every_n_epochs: int = 1, n_samples: int = 2000, batch_size: int | None = None,
                 reference: str = "val", max_reference: int = 5000, figures: bool = True,
                 figures_every_n_evals: int = 1, energy_cap: float = 20.0, smc: SMCSampler | None = None,
                 smc_samples: int = 1000, smc_every_n_evals: int = 1):
        super().__init__()
        if every_n_epochs < 1 or n_samples < 1 or smc_samples < 1 or smc_every_n_evals < 1:
            raise ValueError("SampleEvaluation: every_n_epochs, n_samples, smc_samples and smc_every_n_evals must be ≥ 1")
        self.smc, self.smc_samples, self.smc_every = smc, smc_samples, smc_every_n_evals
        self.every_n_epochs, self.n_samples, self.batch_size = every_n_epochs, n_samples, batch_size
        self.reference, self.max_reference = reference, max_reference
        self.figures, self.figures_every = figures, figures_every_n_evals
        self.energy_cap = energy_cap
        self._ref: dict[str, Tensor] | None = None
        self._evals = 0

    # ------------------------------------------------------------------ reference
    def _reference(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor]:
        if self._ref is not None:
            return self._ref
        dm = trainer.datamodule
        if dm is None or not getattr(dm, "positions", None):
            raise ValueError("SampleEvaluation needs the MD DataModule's held-out frames (data.positions)")
        x = dm.positions[self.reference]
        if len(x) == 0:
            raise ValueError(f"SampleEvaluation: the '{self.reference}' split is empty; give data.split a non-zero "
                             f"{self.reference} fraction")
        stride = max(1, math.ceil(len(x) / self.max_reference))
        x = x[::stride].to(pl_module.device).double()
        top = pl_module.topology
        pairs = backbone_pairs(top).to(x.device)
        phi_q, psi_q = phi_psi_atoms(top)
        phi_q, psi_q = phi_q.to(x.device), psi_q.to(x.device)
        with torch.no_grad():
            u = torch.cat([pl_module.energy(c) for c in x.split(1000)])
        self._ref = dict(x=x, pairs=pairs, phi_q=phi_q, psi_q=psi_q, energy=u,
                         distance_mean=pairwise_distances(x, pairs).mean(0),
                         phi=torsions(x, phi_q), psi=torsions(x, psi_q))
        return self._ref

    # ------------------------------------------------------------------ hook
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or math.inf)
        if (trainer.current_epoch + 1) % self.every_n_epochs and not last:
            return
        self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        ref = self._reference(trainer, pl_module)
        dev = pl_module.device
        out = self.draw(trainer, pl_module)
        x, u, log_w = out["x"], out["energy_kT"], out["log_w"]
        phi, psi = torsions(x, ref["phi_q"]), torsions(x, ref["psi_q"])
        angles, ref_angles = torch.cat([phi, psi], 1), torch.cat([ref["phi"], ref["psi"]], 1)

        metrics = {
            "ess": EffectiveSampleSize(),
            "distance_distortion": DistanceDistortion(ref["distance_mean"]),
            "energy_w2": Wasserstein1D(ref["energy"][:, None]),
            "energy_w2_reweighted": Wasserstein1D(ref["energy"][:, None], weighted=True),
            "torsion_w2": Wasserstein1D(ref_angles, periodic=True),
            "torsion_w2_reweighted": Wasserstein1D(ref_angles, periodic=True, weighted=True),
            "finite_fraction": MeanMetric(),
            "low_energy_fraction": MeanMetric(),
        }
        metrics = {name: metric.to(dev) for name, metric in metrics.items()}
        finite = torch.isfinite(u) & torch.isfinite(log_w)
        metrics["ess"].update(log_w)
        metrics["distance_distortion"].update(pairwise_distances(x, ref["pairs"]))
        # Clashing samples (10^3..10^12 kT) would make the W2 meaningless; they count at the cap.
        u_capped = torch.clamp(u, max=float(ref["energy"].max()) + self.energy_cap)[:, None]
        metrics["energy_w2"].update(u_capped)
        metrics["energy_w2_reweighted"].update(u_capped, log_w)
        metrics["torsion_w2"].update(angles)
        metrics["torsion_w2_reweighted"].update(angles, log_w)
        metrics["finite_fraction"].update(finite.double())
        metrics["low_energy_fraction"].update((finite & (u <= ref["energy"].max())).double())
        # Families that check their samples (EquivariantCNF: chirality, bond graph) report the rates; the
        # ESS above already counts the dropped samples as weight zero.
        for flag, name in (("wrong_chirality", "wrong_chirality_rate"), ("broken_topology", "broken_topology_rate"),
                           ("valid", "valid_fraction")):
            if flag in out:
                metrics[name] = MeanMetric().to(dev)
                metrics[name].update(out[flag].to(dev).double())
        if phi.shape[1] == 1:
            basins = basin_index(phi[:, 0], psi[:, 0])
            for k, name in enumerate(BASINS):
                metrics[f"basin_{name}"] = MeanMetric().to(dev)
                metrics[f"basin_{name}"].update((basins == k).double())
                metrics[f"basin_{name}_reweighted"] = WeightedFraction().to(dev)
                metrics[f"basin_{name}_reweighted"].update(log_w, basins == k)
        smc = None
        if self.smc is not None and self._evals % self.smc_every == 0:
            smc = self._smc(trainer, pl_module, ref, metrics)
        values = {}
        for name, metric in metrics.items():
            values[name] = float(metric.compute())
        for name, value in values.items():
            # identical on every rank already (reduced above); sync_dist only keeps Lightning from warning
            pl_module.log(f"val/{name}", value, on_epoch=True, sync_dist=True, prog_bar=name == "ess")

        self._evals += 1
        if self.figures and (self._evals - 1) % self.figures_every == 0:
            self._figures(trainer, pl_module, ref, u, log_w, phi, psi, smc)
        return values

    def _smc(self, trainer: L.Trainer, pl_module: L.LightningModule, ref: dict[str, Tensor],
             metrics: dict) -> dict[str, Tensor]:
        """Run SMC on this rank's share of ``smc_samples``, resample to equal weights, add ``smc_*`` metrics."""
        dev = pl_module.device
        world, rank = trainer.world_size, trainer.global_rank
        n = self.smc_samples // world + (rank < self.smc_samples % world)
        gen = torch.Generator(device=dev).manual_seed(1_000_003 * trainer.global_step + 7919 * rank + 17)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(1_000_003 * trainer.global_step + 7919 * rank + 29)
            out = pl_module.run_sampler(n, sampler=self.smc, generator=gen)
        idx = systematic_resample(torch.softmax(out["log_w"], 0), gen)
        x, u = out["x"][idx], out["energy_kT"][idx]
        phi, psi = torsions(x, ref["phi_q"]), torsions(x, ref["psi_q"])
        new = {
            "smc_energy_w2": Wasserstein1D(ref["energy"][:, None]),
            "smc_torsion_w2": Wasserstein1D(torch.cat([ref["phi"], ref["psi"]], 1), periodic=True),
            "smc_distance_distortion": DistanceDistortion(ref["distance_mean"]),
            "smc_ess": MeanMetric(), "smc_acceptance": MeanMetric(), "smc_rejection_rate": MeanMetric(),
            "smc_ancestor_fraction": MeanMetric(),
        }
        new = {name: m.to(dev) for name, m in new.items()}
        new["smc_energy_w2"].update(torch.clamp(u, max=float(ref["energy"].max()) + self.energy_cap)[:, None])
        new["smc_torsion_w2"].update(torch.cat([phi, psi], 1))
        new["smc_distance_distortion"].update(pairwise_distances(x, ref["pairs"]))
        new["smc_ess"].update(torch.tensor(out["ess"], dtype=torch.float64))
        new["smc_acceptance"].update(torch.tensor(out["acceptance"] if out["acceptance"] is not None else math.nan,
                                                  dtype=torch.float64))
        new["smc_rejection_rate"].update(torch.tensor(out["rejection_rate"], dtype=torch.float64))
        new["smc_ancestor_fraction"].update(torch.tensor(out["n_ancestors"] / n, dtype=torch.float64))
        if phi.shape[1] == 1:
            basins = basin_index(phi[:, 0], psi[:, 0])
            for k, name in enumerate(BASINS):
                new[f"smc_basin_{name}"] = MeanMetric().to(dev)
                new[f"smc_basin_{name}"].update((basins == k).double())
        metrics.update(new)
        return dict(energy=u, phi=phi, psi=psi)

    def chunks(self, world_size: int, rank: int, default_batch: int) -> list[tuple[int, int]]:
        """(index, size) of the sample chunks this rank draws. The chunking depends on ``n_samples`` and
        the batch size only, so the union over ranks is the same set of samples for any number of ranks
        (when ``n_samples`` ≥ ranks × batch size; otherwise the chunks shrink so that no rank idles)."""
        bs = self.batch_size or default_batch
        if math.ceil(self.n_samples / bs) < world_size:
            bs = math.ceil(self.n_samples / world_size)
        sizes = [min(bs, self.n_samples - i) for i in range(0, self.n_samples, bs)]
        return [(k, size) for k, size in enumerate(sizes) if k % world_size == rank]

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """This rank's share of the evaluation samples (``sample_weighted`` output, concatenated).

        Chunk k is drawn from its own random stream seeded by (global step, k): ranks never draw the
        same samples, one process draws exactly what N processes draw together, and evaluating leaves
        the training's random stream untouched."""
        dev = pl_module.device
        parts = []
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
            for k, size in self.chunks(trainer.world_size, trainer.global_rank, pl_module.sample_batch_size):
                torch.manual_seed(1_000_003 * trainer.global_step + k)
                parts.append(pl_module.sample_weighted(size, size))
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def _figures(self, trainer, pl_module, ref, u, log_w, phi, psi, smc=None) -> None:
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        others = {"SMC": smc["energy"]} if smc else None
        log_figure(trainer, "figures/energy", plots.energy_histogram(ref["energy"], u, log_w, others=others,
                                                                      title=f"energies, epoch {epoch}"))
        top = pl_module.topology
        labels = [f"{top.atom(int(q[1])).residue}" for q in ref["phi_q"]]
        sets = {"MD data": (ref["phi"], ref["psi"], None), "generated": (phi, psi, None),
                "reweighted": (phi, psi, log_w)}
        if smc:
            sets["SMC"] = (smc["phi"], smc["psi"], None)
        log_figure(trainer, "figures/ramachandran", plots.ramachandran(sets, labels))
        log_histogram(trainer, "hist/energy_generated", u.cpu().numpy())
        log_histogram(trainer, "hist/log_w", log_w.cpu().numpy())
