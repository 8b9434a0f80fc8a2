"""Sample-quality evaluation during training: draw samples, weigh them, compare with held-out MD.

The callback only coordinates: the comparison itself is ``bg.evaluation`` (callable without a
Trainer). Every ``every_n_epochs`` validation epochs the generator draws ``n_samples`` and logs the
values of ``bg.evaluation.sample_metrics`` under ``val/`` (torchmetrics reduced across ranks):
``val/ess``, ``val/distance_distortion``, ``val/energy_w2`` and ``val/energy_w2_reweighted``,
``val/torsion_w2`` and ``val/torsion_w2_reweighted``, ``val/finite_fraction``,
``val/low_energy_fraction``, ``val/<flag>_rate`` for the per-sample flags of families that check their
samples (``EquivariantCNF``: ``wrong_chirality`` before mirroring, ``mirrored``, ``broken_topology``,
``valid``; dropped samples count as weight zero in ``val/ess``), and for a single-residue peptide
``val/basin_<name>`` and ``val/basin_<name>_reweighted`` (``bg.analysis.BASINS``).

The samples come in chunks seeded by (``seed``, step, chunk index) and dealt round-robin to the
ranks, so that any number of ranks draws the same samples as one process and logs the same values
(``chunks``, ``draw``).

With ``smc`` set (a ``bg.sampling.SMCSampler``), the same comparison for SMC particles, side by side
with the proposal (``val/smc_*``: energy and torsion W2, ΔD, finite and low-energy fractions, basins)
and the run's statistics (``val/smc_ess``, ``val/smc_acceptance``, ``val/smc_rejection_rate``,
``val/smc_ancestor_fraction``: near 0 means the population collapsed onto a few proposals). Each rank
runs its own population of ``smc_samples / ranks`` particles and resamples it to equal weights at the
end, so the ranks' samples pool like unweighted samples.

Figures (rank 0's samples): energy histogram (MD / generated / reweighted) and Ramachandran
free-energy maps (MD / generated / reweighted), plus W&B/TensorBoard histograms of energies and
log weights. The reference is the DataModule's ``val`` split (at most ``max_reference`` frames,
evenly strided).
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from bg import plots
from bg.evaluation import Reference, compute, resampled, sample_metrics, sampler_metrics, stream_seed
from bg.sampling import SMCSampler
from callbacks.figures import log_figure, log_histogram


#: samples per evaluation under ``trainer.fast_dev_run``
FAST_DEV_RUN_SAMPLES = 256
#: the beginnings of the names this callback logs (only on its evaluation epochs)
LOGGED = ("val/ess", "val/distance_distortion", "val/energy_w2", "val/torsion_w2", "val/finite_fraction",
          "val/low_energy_fraction", "val/basin_", "val/smc_")


class SampleEvaluation(Callback):
    """Evaluate generated samples against held-out MD (see module docstring).

    Args:
        every_n_epochs: evaluate on validation runs at the end of epochs 1-based divisible by n (and at
            the last epoch); combine with ``trainer.check_val_every_n_epoch``. A run that ends between
            evaluations (``max_steps``, a last epoch without validation) is evaluated at its end.
        n_samples: samples per evaluation, over all ranks (at most 256 under ``trainer.fast_dev_run``).
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
        seed: base of the evaluation's random streams (with the step and chunk or rank).
    """

    def __init__(self, every_n_epochs: int = 1, n_samples: int = 2000, batch_size: int | None = None,
                 reference: Literal["val", "test"] = "val", max_reference: int = 5000, figures: bool = True,
                 figures_every_n_evals: int = 1, energy_cap: float = 20.0, smc: SMCSampler | None = None,
                 smc_samples: int = 1000, smc_every_n_evals: int = 1, seed: int = 0):
        super().__init__()
        if every_n_epochs < 1 or n_samples < 1 or smc_samples < 1 or smc_every_n_evals < 1:
            raise ValueError("SampleEvaluation: every_n_epochs, n_samples, smc_samples and smc_every_n_evals must be ≥ 1")
        self.smc, self.smc_samples, self.smc_every = smc, smc_samples, smc_every_n_evals
        self.every_n_epochs, self.n_samples, self.batch_size = every_n_epochs, n_samples, batch_size
        self.reference, self.max_reference = reference, max_reference
        self.figures, self.figures_every = figures, figures_every_n_evals
        self.energy_cap, self.seed = energy_cap, seed
        self._ref: Reference | None = None
        self._evals = 0
        self._evaluated_step: int | None = None

    @property
    def evaluations(self) -> int:
        """How many evaluations this callback has run (on this rank)."""
        return self._evals

    def _reference(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Reference:
        if self._ref is None:
            dm = trainer.datamodule
            if dm is None or not getattr(dm, "positions", None):
                raise ValueError("SampleEvaluation needs the MD DataModule's held-out frames (data.positions)")
            if len(dm.positions[self.reference]) == 0:
                raise ValueError(f"SampleEvaluation: the '{self.reference}' split is empty; give data.split a non-zero "
                                 f"{self.reference} fraction")
            # MD frames as the model can express them (frozen coordinates at its means), so that their energies
            # compare with the samples' (no-op for a model that freezes nothing)
            self._ref = Reference.from_frames(dm.positions[self.reference].to(pl_module.device), pl_module.topology,
                                              pl_module.energy, self.max_reference,
                                              project=getattr(pl_module, "on_model_coordinates", None))
        return self._ref

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not trainer.fast_dev_run:  # fast_dev_run validates every epoch and saves nothing
            self._check_schedule(trainer)

    def _check_schedule(self, trainer: L.Trainer) -> None:
        """Refuse, at set-up, a checkpoint that monitors one of this callback's metrics on validation epochs
        without an evaluation (Lightning would stop the run there, after the first such epoch)."""
        val_every = trainer.check_val_every_n_epoch or 1
        for ckpt in trainer.checkpoint_callbacks:
            monitor = getattr(ckpt, "monitor", None)
            if not monitor or not monitor.startswith(LOGGED):
                continue
            ckpt_every = getattr(ckpt, "_every_n_epochs", 1) or 1
            checked = math.lcm(val_every, ckpt_every)  # epochs (1-based multiples) on which it reads the metric
            if checked % self.every_n_epochs:
                raise ValueError(
                    f"trainer.check_val_every_n_epoch {val_every} validates on epochs without a sample evaluation "
                    f"(SampleEvaluation every_n_epochs {self.every_n_epochs}), where ModelCheckpoint(monitor="
                    f"'{monitor}') finds no value: set trainer.check_val_every_n_epoch to a multiple of "
                    f"{self.every_n_epochs}, or SampleEvaluation's every_n_epochs to {math.gcd(self.every_n_epochs, checked)}"
                    f", or that checkpoint's every_n_epochs to {self.every_n_epochs}")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or math.inf)
        if (trainer.current_epoch + 1) % self.every_n_epochs and not last:
            return
        self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run that ended between evaluation epochs (``max_steps`` inside an epoch, a last epoch without
        validation, a loss stage that ends training) is evaluated once more at its final weights, so that every
        run reports how good its generator is. Not when validation is switched off or nothing was trained."""
        if trainer.global_step == 0 or self._evaluated_step == trainer.global_step or not trainer.enable_validation:
            return
        self.evaluate(trainer, pl_module, final=True)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool = False) -> dict[str, float]:
        """Draw, weigh and compare; log ``val/*``. ``final``: outside a validation epoch (at the end of training,
        where Lightning allows no ``self.log``), so the values go to the loggers and ``trainer.callback_metrics``
        directly."""
        ref = self._reference(trainer, pl_module)
        out = self.draw(trainer, pl_module)
        metrics = sample_metrics(ref, out, self.energy_cap)
        smc = None
        if self.smc is not None and self._evals % self.smc_every == 0:
            smc = self._smc(trainer, pl_module, ref, metrics)
        values = compute(metrics)
        if final:
            logged = {f"val/{name}": value for name, value in values.items()}
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(logged, step=trainer.global_step)
                    logger.save()
        else:
            for name, value in values.items():
                # identical on every rank already (reduced above); sync_dist only keeps Lightning from warning
                pl_module.log(f"val/{name}", value, on_epoch=True, sync_dist=True, prog_bar=name == "ess")
        self._evals += 1
        self._evaluated_step = trainer.global_step
        if self.figures and (self._evals - 1) % self.figures_every == 0:
            self._figures(trainer, pl_module, ref, out, smc)
        return values

    def _smc(self, trainer: L.Trainer, pl_module: L.LightningModule, ref: Reference, metrics: dict) -> dict[str, Tensor]:
        """Run SMC on this rank's share of ``smc_samples``, resample to equal weights, add ``smc_*`` metrics."""
        dev = pl_module.device
        world, rank = trainer.world_size, trainer.global_rank
        n = self.smc_samples // world + (rank < self.smc_samples % world)
        # the populations' streams sit apart from the sample chunks' (index ≥ 7919·rank + 17 > any chunk here)
        gen = torch.Generator(device=dev).manual_seed(stream_seed(self.seed, trainer.global_step, 7919 * rank + 17))
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(stream_seed(self.seed, trainer.global_step, 7919 * rank + 29))
            out = self.smc(pl_module.proposal, pl_module.energy, n, generator=gen)
        particles = resampled(out, gen)
        metrics.update(sample_metrics(ref, particles, self.energy_cap, "smc_"))
        metrics.update(sampler_metrics(out, n, "smc_"))
        return particles

    def chunks(self, world_size: int, rank: int, default_batch: int, n_samples: int | None = None) -> list[tuple[int, int]]:
        """(index, size) of the sample chunks this rank draws. The chunking depends on ``n_samples`` (default:
        the callback's) and the batch size only, so the union over ranks is the same set of samples for any
        number of ranks (when ``n_samples`` ≥ ranks × batch size; otherwise the chunks shrink so that no rank
        idles)."""
        n = n_samples or self.n_samples
        bs = self.batch_size or default_batch
        if math.ceil(n / bs) < world_size:
            bs = math.ceil(n / world_size)
        sizes = [min(bs, n - i) for i in range(0, n, bs)]
        return [(k, size) for k, size in enumerate(sizes) if k % world_size == rank]

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """This rank's share of the evaluation samples (``Proposal.weigh`` output, concatenated).

        Chunk k is drawn from its own random stream seeded by (seed, global step, k): ranks never draw the
        same samples, one process draws exactly what N processes draw together, and evaluating leaves
        the training's random stream untouched. The module is in eval mode meanwhile (as in a validation
        epoch; the final evaluation is not in one): training-only speed options, such as bfloat16 conditioners,
        never judge the flow."""
        dev = pl_module.device
        parts = []
        mode = pl_module.training
        pl_module.eval()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
            # fast_dev_run checks the code path, not the sampler: a few hundred samples do that in seconds
            n = min(self.n_samples, FAST_DEV_RUN_SAMPLES) if trainer.fast_dev_run else self.n_samples
            for k, size in self.chunks(trainer.world_size, trainer.global_rank, pl_module.sample_batch_size, n):
                torch.manual_seed(stream_seed(self.seed, trainer.global_step, k))
                parts.append(pl_module.proposal.weigh(size, pl_module.energy, batch_size=size))
        pl_module.train(mode)
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def _figures(self, trainer, pl_module, ref: Reference, out: dict[str, Tensor], smc: dict | None = None) -> None:
        if not trainer.is_global_zero:
            return
        u, log_w = out["energy_kT"], out["log_w"]
        phi, psi = ref.angles(out["x"]).chunk(2, 1)
        others = {"SMC": smc["energy_kT"]} if smc else None
        log_figure(trainer, "figures/energy", plots.energy_histogram(ref.energy, u, log_w, others=others,
                                                                      title=f"energies, epoch {trainer.current_epoch}"))
        top = pl_module.topology
        labels = [f"{top.atom(int(q[1])).residue}" for q in ref.phi_atoms]
        sets = {"MD data": (ref.phi, ref.psi, None), "generated": (phi, psi, None), "reweighted": (phi, psi, log_w)}
        if smc:
            sets["SMC"] = tuple(ref.angles(smc["x"]).chunk(2, 1)) + (None,)
        log_figure(trainer, "figures/ramachandran", plots.ramachandran(sets, labels))
        log_histogram(trainer, "hist/energy_generated", u.cpu().numpy())
        log_histogram(trainer, "hist/log_w", log_w.cpu().numpy())
