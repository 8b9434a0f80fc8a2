"""The LightningModule base shared by every generator family.

A generator = a representation + a flow (built by the subclass once the molecule is known) + the
target energy u(x) in kT + named loss terms. The module computes terms; it never decides the
schedule: ``loss_weights`` (a dict term → weight) is set by the ``LossStages`` callback, or stays
at the value given in the config.

Public API (also what callbacks use): ``sample(n) -> (x, log_q)``, ``log_prob(x)``, ``energy(x)``,
``topology``, ``system``. ``x`` is always Cartesian ``(B, N, 3)`` nm and ``log_q`` the density in
Cartesian space (representation Jacobian included), so ``log_w = −u(x) − log_q(x)``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import mdtraj as md
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bg.energy import linlog_cut, target_energy
from bg.sampling import ImportanceSampler, Sampler, SMCSampler
from bg.systems import MolecularSystem

log = logging.getLogger(__name__)


class _SampleCounts(torch.utils.data.Dataset):
    """Batches for ``predict``: item i is the number of samples to draw in batch i (one batch per rank
    when a sampler needs all particles at once)."""

    def __init__(self, n: int, batch_size: int):
        self.sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> int:
        return self.sizes[i]


class BoltzmannGenerator(L.LightningModule):
    """Base LightningModule of a Boltzmann generator (see module docstring).

    Args:
        loss_weights: term → weight used when no ``LossStages`` callback is attached.
        lr, weight_decay: Adam(W) settings (a stage may change ``lr``).
        energy_backend: ``"auto"`` (torch force field where it applies), ``"torch"`` or ``"openmm"``.
        energy_compile: ``torch.compile`` the torch force field (pays off on GPU and for large batches).
        energy_cut: kT above which the training energy grows logarithmically (``linlog_cut``).
        energy_workers: OpenMM worker processes per rank when the OpenMM backend is used (0: in
            process); each worker gets this rank's share of the cores (Lightning gives every DDP
            rank cores / ranks threads), so N ranks do not oversubscribe the machine.
        sample_batch_size: batch size of ``sample`` / prediction.
        predict_samples: how many samples ``predict`` draws (in total, over all devices).
        sampler: what ``predict`` does with the proposal samples: ``None`` writes them with their
            importance weights batch by batch; ``bg.sampling.ImportanceSampler`` (optional clipping of
            the top weights) or ``bg.sampling.SMCSampler`` (annealed Langevin; each rank runs one
            population of ``predict_samples / ranks`` particles) write the sampler's output
            (``run_sampler``).
        max_skipped_in_a_row: a training step whose loss or gradients are not finite is skipped (no
            optimizer update, counted as ``train/skipped_steps``); this many in a row stop the run
            with an error, since the weights or data are then broken rather than unlucky.

    Batch sizes are per device: the DataModule's ``batch_size``, and ``w2_batch_size`` /
    ``kl_batch_size`` of the families, are drawn on each DDP rank, so N devices see N times as
    many samples per optimizer step (the learning rate is not rescaled). ``predict_samples`` and the
    evaluation callbacks' ``n_samples`` are totals over all ranks.
    """

    #: names of the loss terms the family computes (methods ``term_<name>``)
    loss_terms: tuple[str, ...] = ()

    def __init__(self, loss_weights: dict[str, float] | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 energy_backend: str = "auto", energy_compile: bool = False, energy_cut: float = 1e3,
                 energy_workers: int = 0, sample_batch_size: int = 1000, predict_samples: int = 10_000,
                 sampler: Sampler | None = None, max_skipped_in_a_row: int = 20):
        super().__init__()
        self.loss_weights = dict(loss_weights or {"nll": 1.0})
        self.check_loss_weights(self.loss_weights)
        self.lr, self.weight_decay = lr, weight_decay
        self.energy_backend, self.energy_compile, self.energy_cut = energy_backend, energy_compile, energy_cut
        self.energy_workers = energy_workers
        self.sample_batch_size, self.predict_samples = sample_batch_size, predict_samples
        self.sampler = sampler
        if max_skipped_in_a_row < 1:
            raise ValueError(f"model.max_skipped_in_a_row must be ≥ 1, got {max_skipped_in_a_row}")
        self.max_skipped_in_a_row = max_skipped_in_a_row
        self.skipped_steps = 0  # in checkpoints (bg_skipped_steps)
        self._skipped_in_a_row = 0
        self._loss_nonfinite = False
        self._resume_rng: Tensor | None = None
        self.system: MolecularSystem | None = None
        # Held in a dict so that it is not a submodule: its buffers stay out of checkpoints.
        self._energy_holder: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ building
    def check_loss_weights(self, weights: dict[str, float]) -> None:
        unknown = sorted(set(weights) - set(self.loss_terms))
        if unknown:
            raise ValueError(f"{type(self).__name__} has loss terms {', '.join(self.loss_terms)}; "
                             f"unknown term(s) {', '.join(unknown)} in the loss weights")

    @property
    def is_built(self) -> bool:
        return self.system is not None

    def build(self, system: MolecularSystem, train_positions: Tensor | None) -> None:
        """Create representation and flow for ``system``; fit data-dependent buffers (bounds, frozen
        geometry, base statistics) to ``train_positions`` ``(F, N, 3)`` nm when given (when restoring
        a checkpoint they come from the state dict instead)."""
        self.system = system
        self.build_model(system, train_positions)

    def build_model(self, system: MolecularSystem, train_positions: Tensor | None) -> None:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        self.configure_model()
        if not self.is_built:
            raise ValueError(f"{type(self).__name__} needs an MD DataModule (data: datamodules.MDDataModule) "
                             "to learn the molecule, or a checkpoint (ckpt_path) to restore it")

    def configure_model(self) -> None:
        """Build the flow for the DataModule's molecule (idempotent; nothing without one). Lightning calls
        it after ``setup`` and when loading a checkpoint; weight-averaging callbacks (EMA) call it earlier
        to copy the built model."""
        if self.is_built or self._trainer is None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "system"):
            return
        dm.setup("fit")
        self.build(dm.system, dm.positions["train"])

    def build_from_checkpoint(self, ckpt_path: str) -> None:
        """Build the (untrained) modules for the molecule stored in a checkpoint; the weights are
        loaded afterwards by Lightning or ``load_state_dict``."""
        if not self.is_built:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if "bg_system" not in ckpt:
                raise ValueError(f"{ckpt_path}: not a bg generator checkpoint (no 'bg_system' entry)")
            self.build(MolecularSystem.from_dict(ckpt["bg_system"]), None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bg_system"] = self.system.to_dict()
        checkpoint["bg_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["bg_loss_weights"] = dict(self.loss_weights)
        checkpoint["bg_skipped_steps"] = self.skipped_steps
        # Rank 0's random stream (flow samples of the w2/kl terms): a resumed single-device run
        # continues exactly as if it had never stopped.
        checkpoint["bg_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.is_built:
            self.build(MolecularSystem.from_dict(checkpoint["bg_system"]), None)
        self.loss_weights = dict(checkpoint.get("bg_loss_weights", self.loss_weights))
        self.skipped_steps = int(checkpoint.get("bg_skipped_steps", 0))
        self._resume_rng = checkpoint.get("bg_rng_state")

    # ------------------------------------------------------------------ physics
    @property
    def topology(self) -> md.Topology:
        return self.system.topology

    @property
    def target(self) -> nn.Module:
        """The physical target energy module ``(B, N, 3)`` nm → ``(B,)`` kT."""
        if "u" not in self._energy_holder:
            self._energy_holder["u"] = target_energy(self.system, backend=self.energy_backend,
                                                     compile=self.energy_compile, n_workers=self.energy_workers)
        return self._energy_holder["u"]

    def energy(self, x: Tensor) -> Tensor:
        """Reduced energy u(x) ``(B,)`` in kT (float64) of frames ``(B, N, 3)`` nm; differentiable."""
        target = self.target
        buf = next(iter(target.buffers()), None)
        if buf is not None and buf.device != x.device:
            target.to(x.device)
        return target(x.double())

    def training_energy(self, x: Tensor) -> Tensor:
        """``energy`` with the linear-logarithmic cut of huge values (for losses)."""
        return linlog_cut(self.energy(x), high=self.energy_cut)

    # ------------------------------------------------------------------ the generator
    def sample_with_grad(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` reparameterised samples: x ``(n, N, 3)`` nm float64, log_q ``(n,)`` (Cartesian)."""
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """Cartesian log density ``(B,)`` of frames ``(B, N, 3)`` nm."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples without gradients, in batches: x ``(n, N, 3)`` nm (float64) and log_q ``(n,)``."""
        bs = batch_size or self.sample_batch_size
        xs, lqs = [], []
        for i in range(0, n, bs):
            x, lq = self.sample_with_grad(min(bs, n - i))
            xs.append(x)
            lqs.append(lq)
        return torch.cat(xs), torch.cat(lqs)

    @torch.no_grad()
    def sample_weighted(self, n: int, batch_size: int | None = None) -> dict[str, Tensor]:
        """Samples with their energies and log importance weights: ``x``, ``log_q``, ``energy_kT``, ``log_w``,
        plus the per-sample flags of ``check_samples`` (samples flagged not ``valid`` get log_w = −inf)."""
        x, log_q = self.sample(n, batch_size)
        x, log_q, flags = self.check_samples(x, log_q)
        bs = batch_size or self.sample_batch_size
        u = torch.cat([self.energy(c) for c in x.split(bs)])
        log_w = -u - log_q.double()
        if "valid" in flags:
            log_w = log_w.masked_fill(~flags["valid"], -math.inf)
        return dict(x=x, log_q=log_q, energy_kT=u, log_w=log_w, **flags)

    def check_samples(self, x: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Fix or flag generated frames ``(B, N, 3)`` before they are weighed: returns the frames, their
        log q and per-sample boolean flags (a ``valid`` flag drops samples). Default: unchanged, no flags."""
        return x, log_q, {}

    # ------------------------------------------------------------------ samplers (IS / SMC)
    # SMC moves particles in a space of the family's choosing; the default is Cartesian nm with
    # E0 = −log q(x) and E1 = u(x) (both invariant to rigid motions for internal-coordinate flows).
    def draw_particles(self, n: int) -> Tensor:
        """``n`` proposal particles (float64) in the space SMC works in (default: Cartesian frames, nm)."""
        return self.sample(n)[0]

    def source_energy(self, s: Tensor) -> Tensor:
        """E0 = −log q of particles ``(B, ...)`` → ``(B,)``, differentiable."""
        return -self.log_prob(s)

    def sampler_target_energy(self, s: Tensor) -> Tensor:
        """E1 of particles ``(B, ...)`` → ``(B,)`` kT, differentiable (default: u)."""
        return self.energy(s)

    def particles_to_frames(self, s: Tensor) -> Tensor:
        """Cartesian frames ``(B, N, 3)`` nm of particles."""
        return s

    def run_sampler(self, n: int, sampler: Sampler | None = None, generator: torch.Generator | None = None,
                    progress: bool = False) -> dict[str, Any]:
        """Draw ``n`` proposal samples and pass them through ``sampler`` (default: ``self.sampler``, else plain
        importance sampling). Returns ``x`` ``(n, N, 3)`` nm, ``log_w`` ``(n,)`` (final weights), ``energy_kT``
        ``(n,)``, ``log_q`` (importance sampling only) and the sampler's statistics (``ess``, ``log_z``, ...)."""
        sampler = sampler or self.sampler or ImportanceSampler()
        bs = self.sample_batch_size
        if isinstance(sampler, ImportanceSampler):
            out = self.sample_weighted(n)
            e0 = -out["log_q"].double()
            if "valid" in out:  # samples a family's checks dropped (chirality, topology) weigh zero
                e0 = e0.masked_fill(~out["valid"].to(e0.device), -math.inf)
            res = sampler(e0, out["energy_kT"])
            return dict(out, log_w=res.log_w, sampler=sampler.name, ess=res.ess, log_z=res.log_z,
                        n_clipped=res.n_clipped, n_rejected=res.n_rejected)
        if not isinstance(sampler, SMCSampler):
            raise TypeError(f"unknown sampler {type(sampler).__name__}; use bg.sampling.ImportanceSampler or SMCSampler")
        # SMC needs gradients; Lightning's predict and validation loops run in inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            res = sampler(self.draw_particles(n), self.source_energy, self.sampler_target_energy, generator=generator,
                          progress=progress)
        x = self.particles_to_frames(res.x).double()
        with torch.no_grad():
            u = torch.cat([self.energy(c) for c in x.split(bs)])
        return dict(x=x, log_w=res.log_w, energy_kT=u, sampler=sampler.name, ess=res.ess, log_z=res.log_z,
                    ess_history=res.ess_history, resampled_at=res.resampled_at, acceptance=res.acceptance,
                    n_rejected=res.n_rejected, rejection_rate=res.rejection_rate, n_ancestors=res.n_ancestors)

    # ------------------------------------------------------------------ Lightning
    def on_train_start(self) -> None:
        if self._resume_rng is not None:
            torch.set_rng_state(self._resume_rng)
            self._resume_rng = None
        # seed_everything gives every DDP rank the same seed: the flow's own samples (w2, kl) would be
        # identical on all ranks and the averaged gradient no better than one rank's. The step enters
        # the seed so that a resumed run does not replay the samples of the first steps.
        if self.trainer.world_size > 1:
            seed = torch.initial_seed() + 7919 * self.trainer.global_rank + 104_729 * self.trainer.global_step
            torch.manual_seed(seed % 2**63)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x = batch[0]
        loss = x.new_zeros((), dtype=torch.float32)
        logs = {}
        for name, weight in self.loss_weights.items():
            if weight == 0:
                continue
            value = getattr(self, f"term_{name}")(x)
            logs[f"train/{name}"] = value.detach()
            loss = loss + weight * value.float()
        self._loss_nonfinite = not bool(torch.isfinite(loss))
        if self._loss_nonfinite:
            log.warning("rank %d, step %d: non-finite training loss (%s); the step is skipped", self.global_rank,
                        self.global_step, ", ".join(f"{k}={v.item():.4g}" for k, v in logs.items()))
            # NaN gradients on every parameter: under DDP the gradient all-reduce carries them to every
            # rank, so all ranks skip this step together (no extra collective, no rank left waiting).
            return sum((p * math.nan).sum() for p in self.parameters() if p.requires_grad)
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=len(x))
        self.log("loss", loss.detach(), prog_bar=True, logger=False, on_step=True, batch_size=len(x))
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Run forward/backward, then step only if the loss and all gradients are finite."""
        optimizer_closure()
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # one device sync per step, not one per parameter
        finite = not self._loss_nonfinite and bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if finite:
            self._skipped_in_a_row = 0
            optimizer.step()  # gradient clipping and on_before_optimizer_step run inside, as usual
            return
        self.skipped_steps += 1
        self._skipped_in_a_row += 1
        optimizer.zero_grad(set_to_none=True)
        if not self._loss_nonfinite:
            log.warning("rank %d, step %d: non-finite gradients; the step is skipped", self.global_rank, self.global_step)
        if self._skipped_in_a_row >= self.max_skipped_in_a_row:
            raise FloatingPointError(
                f"{self._skipped_in_a_row} training steps in a row had a non-finite loss or gradients (last at step "
                f"{self.global_step}); the run is stopped. Lower the learning rate, the energy_cut or the loss weights "
                "of the energy terms, or resume from an earlier checkpoint.")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=1)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        x = batch[0]
        self.log("val/nll", -self.log_prob(x).mean(), prog_bar=True, sync_dist=True, batch_size=len(x))

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        x = batch[0]
        self.log("test/nll", -self.log_prob(x).mean(), sync_dist=True, batch_size=len(x))

    def predict_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self._trainer is not None else 1
        per_rank = math.ceil(self.predict_samples / world)
        # Each rank gets its own sampler slice of the dataset; give every rank per_rank samples (in one
        # item when a sampler weighs them all together).
        batch = self.sample_batch_size if self.sampler is None else per_rank
        return DataLoader(_SampleCounts(per_rank * world, batch), batch_size=None)

    def predict_step(self, batch: int, batch_idx: int) -> dict[str, Any]:
        if self.sampler is None:
            out = self.sample_weighted(int(batch))
        else:
            out = self.run_sampler(int(batch), progress=True)
        return {k: v.cpu() if isinstance(v, Tensor) else v for k, v in out.items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
