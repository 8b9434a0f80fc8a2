"""The LightningModule base shared by every generator family.

A generator = a Cartesian density (``bg.flows.CartesianDensity``: prior ∘ flow ∘ representation,
built by the family once the molecule is known) + the target energy u(x) in kT + named loss terms. The
module computes terms; it never decides the schedule: ``loss_weights`` (a dict term → weight) is set
by the ``LossStages`` callback, or stays at the value given in the config.

Public API (also what callbacks use): ``density``, ``proposal`` (what samplers take), ``sample(n) ->
(x, log_q)``, ``log_prob(x)``, ``energy(x)``, ``topology``, ``system``. ``x`` is always Cartesian
``(B, N, 3)`` nm and ``log_q`` the density in Cartesian space (representation Jacobian included), so
``log_w = −u(x) − log_q(x)``.

Adding a family: subclass, declare its options in ``__init__`` (``**kwargs`` to this base), set
``loss_terms`` and implement ``build_density`` (and ``term_<name>`` for terms beyond ``nll``/``kl``);
see CONTRIBUTING.md.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import mdtraj as md
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from bg.choices import check_choices
from bg.coordinates.rotors import rotor_groups, turn_rotors
from bg.energy import LazyTargetEnergy, linlog_cut
from bg.energy.factory import Backend
from bg.flows import CartesianDensity
from bg.models.persistence import CheckpointHooks
from bg.models.predict import predict_batch, predict_loader
from bg.models.steps import NonFiniteStepGuard
from bg.sampling import Proposal, Sampler
from bg.systems import MolecularSystem

Optimizer = Literal["adamw", "adam"]


class BoltzmannGenerator(CheckpointHooks, L.LightningModule):
    """Base LightningModule of a Boltzmann generator (see module docstring).

    Args:
        loss_weights: term → weight used when no ``LossStages`` callback is attached.
        lr, weight_decay: optimizer settings. ``LossStages`` is the one owner of the learning rate
            during training (its stages set ``lr`` and cosine decays); configure schedules there.
        optimizer: ``adamw`` or ``adam`` (Adam with L2 ``weight_decay`` in the gradient).
        energy_backend: ``"auto"`` (torch force field where it applies), ``"torch"`` or ``"openmm"``.
        energy_compile: ``torch.compile`` the torch force field (pays off on GPU and for large batches).
        energy_cut: kT above which the training energy grows logarithmically (``linlog_cut``).
        energy_workers: OpenMM worker processes per rank when the OpenMM backend is used (0: in
            process); each worker gets this rank's share of the cores.
        sample_batch_size: batch size of ``sample`` / prediction / energy evaluation of samples.
        predict_samples: how many samples ``predict`` draws (in total, over all devices).
        sampler: what ``predict`` does with the proposal samples: ``None`` writes them with their
            importance weights batch by batch; ``bg.sampling.ImportanceSampler`` (optional clipping of
            the top weights) or ``bg.sampling.SMCSampler`` (annealed Langevin; each rank runs one
            population of ``predict_samples / ranks`` particles) write the sampler's output.
        max_skipped_in_a_row: a training step whose loss or gradients are not finite is skipped (no
            optimizer update, counted as ``train/skipped_steps``); this many in a row stop the run.
        mcmc_steps, mcmc_step_size: Metropolis-adjusted Langevin steps (step size h in nm²; the move is
            −h∇u + √(2h)ξ) that refine the flow's samples towards exp(−u) in the ``nll_mcmc`` term.
        augment_rotors: turn every methyl / NH3+ group of each training frame by a random multiple of 120°
            (a cyclic relabelling of its hydrogens, ``bg.coordinates.rotors``): the same target, 3^G times the
            distinct frames. Checked on each molecule's first training frames: u must not change under the turns.

    Batch sizes are per device (DataModule ``batch_size``, ``w2_batch_size``, ``kl_batch_size``);
    ``predict_samples`` and the evaluation callbacks' ``n_samples`` are totals over all ranks.
    """

    #: names of the loss terms the family computes (methods ``term_<name>``)
    loss_terms: tuple[str, ...] = ()

    def __init__(self, loss_weights: dict[str, float] | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 optimizer: Optimizer = "adamw", energy_backend: Backend = "auto", energy_compile: bool = False,
                 energy_cut: float = 1e3, energy_workers: int = 0, sample_batch_size: int = 1000,
                 predict_samples: int = 10_000, sampler: Sampler | None = None, max_skipped_in_a_row: int = 20,
                 mcmc_steps: int = 20, mcmc_step_size: float = 1e-6, augment_rotors: bool = False):
        super().__init__()
        # every family's options and these, in one place (the frames of the subclasses' __init__ included)
        self.save_hyperparameters(ignore=["sampler"])
        for cls in type(self).__mro__:
            if "__init__" in vars(cls) and issubclass(cls, BoltzmannGenerator):
                check_choices(cls.__init__, dict(self.hparams), "model.")
        self.loss_weights = dict(loss_weights or {self.loss_terms[0]: 1.0})
        self.check_loss_weights(self.loss_weights)
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.energy_cut, self.sample_batch_size, self.predict_samples = energy_cut, sample_batch_size, predict_samples
        self.sampler = sampler
        self.guard = NonFiniteStepGuard(max_skipped_in_a_row)
        self._resume_rng: Tensor | None = None
        self.energy_evaluations = 0
        self._step_cache: dict | None = None  # values shared by loss terms within one training step
        self.system: MolecularSystem | None = None
        self.target: LazyTargetEnergy | None = None
        self.density: CartesianDensity | None = None
        self._rotors: dict[str, Tensor] = {}  # system name → rotor hydrogen triples, checked (augment_rotors)

    # ------------------------------------------------------------------ building
    def check_loss_weights(self, weights: dict[str, float]) -> None:
        unknown = sorted(set(weights) - set(self.loss_terms))
        if unknown:
            raise ValueError(f"{type(self).__name__} has loss terms {', '.join(self.loss_terms)}; "
                             f"unknown term(s) {', '.join(unknown)} in the loss weights")

    @property
    def is_built(self) -> bool:
        return self.system is not None

    def build_density(self, system: MolecularSystem) -> CartesianDensity:
        """The family's density for ``system``, untrained and not yet fitted to data."""
        raise NotImplementedError

    def build(self, system: MolecularSystem, train_positions: Tensor | None) -> None:
        """Create the density for ``system``; fit its data-dependent buffers (bounds, frozen geometry, scale,
        base statistics) to ``train_positions`` ``(F, N, 3)`` nm when given (when restoring a checkpoint they
        come from the state dict instead)."""
        self.system = system
        self.target = self.new_target(system)
        density = self.build_density(system)
        if train_positions is not None:
            density.fit(train_positions)
        self.density = density.to(self.device)

    def rotors(self, x: Tensor) -> Tensor:
        """The current molecule's rotor hydrogen triples ``(G, 3)`` (``bg.coordinates.rotors``), found and checked
        on its first frames ``x`` ``(B, N, 3)`` nm: turning them must leave u unchanged (to 1e-6 relative, at least
        1e-6 kT: summation order in a single-precision OpenMM platform), or a force field that gives a group's
        hydrogens different parameters would make the augmentation wrong."""
        name = self.system.name
        if name not in self._rotors:
            groups = rotor_groups(self.topology)
            x = x[:4].detach().double()
            change, tolerance = 0.0, 1e-6
            if len(groups):
                with torch.no_grad():
                    u = self.energy(x)
                    change = (self.energy(turn_rotors(x, groups)) - u).abs().max().item()
                tolerance = 1e-6 * max(1.0, u.abs().max().item())
            else:
                rank_zero_warn(f"model.augment_rotors: {name} has no methyl or NH3+ group; its frames are not turned")
            if not change <= tolerance:
                names = [[self.topology.atom(int(i)).name for i in g] for g in groups]
                raise ValueError(f"model.augment_rotors: turning the rotor hydrogens {names} of {name} changes the "
                                 f"energy by up to {change:.3g} kT, so they are not equivalent in this force field; "
                                 "set model.augment_rotors: false")
            self._rotors[name] = groups
        return self._rotors[name]

    def new_target(self, system: MolecularSystem) -> LazyTargetEnergy:
        """The target energy of ``system`` with the model's energy settings."""
        hp = self.hparams
        return LazyTargetEnergy(system, hp.energy_backend, hp.energy_compile, hp.energy_workers)

    def setup(self, stage: str) -> None:
        self.configure_model()
        if not self.is_built:
            raise ValueError(f"{type(self).__name__} needs an MD DataModule (data: datamodules.MDDataModule) "
                             "to learn the molecule, or a checkpoint (ckpt_path) to restore it")

    def configure_model(self) -> None:
        """Build the density for the DataModule's molecule (idempotent; nothing without one). Lightning calls
        it after ``setup`` and when loading a checkpoint; weight-averaging callbacks (EMA) call it earlier."""
        if self.is_built or self._trainer is None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "system"):
            return
        dm.setup("fit")
        self.build(dm.system, dm.positions["train"])

    # ------------------------------------------------------------------ the generator
    @property
    def topology(self) -> md.Topology:
        return self.system.topology

    @property
    def flow(self):
        """The family's flow (in its own space)."""
        return self.density.flow

    @property
    def representation(self):
        """The representation the flow works in."""
        return self.density.representation

    @property
    def proposal(self) -> Proposal:
        """The generator as samplers see it (``bg.sampling.Proposal``)."""
        return Proposal(self.density, self.sample_batch_size, differentiable=self.density.reparameterized,
                        name=type(self).__name__, topology=self.topology)

    def energy(self, x: Tensor) -> Tensor:
        """Reduced energy u(x) ``(B,)`` in kT (float64) of frames ``(B, N, 3)`` nm; differentiable."""
        return self.target(x)

    @property
    def freezes_coordinates(self) -> bool:
        """Whether the model's representation holds coordinates fixed (reduced internal coordinates, frozen bonds)."""
        rep = getattr(getattr(self, "density", None), "representation", None)
        return bool(getattr(rep, "has_frozen", False))

    def on_model_coordinates(self, x: Tensor) -> Tensor:
        """Frames ``(B, N, 3)`` nm as the model can express them: after a round trip through its representation
        when that holds coordinates fixed (:attr:`freezes_coordinates`), else ``x`` itself. Energies of MD
        frames compared with the model's samples need this: the frozen coordinates' thermal energy (kT/2 each)
        is in the MD's energies but in no sample's."""
        if not self.freezes_coordinates:
            return x
        rep = self.density.representation
        with torch.no_grad():
            return rep.inverse(rep(x.double())[0])[0].to(x.dtype)

    def training_energy(self, x: Tensor) -> Tensor:
        """``energy`` with the linear-logarithmic cut of huge values (for losses); counted in
        ``energy_evaluations`` (frames), logged as ``train/energy_evaluations`` so that the ESS can be read
        against the energy budget, as the literature reports it."""
        self.energy_evaluations += len(x)
        return linlog_cut(self.energy(x), high=self.energy_cut)

    def log_prob(self, x: Tensor) -> Tensor:
        """Cartesian log density ``(B,)`` of frames ``(B, N, 3)`` nm."""
        return self.density.log_prob(x)

    def sample(self, n: int, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples without gradients, in batches: x ``(n, N, 3)`` nm (float64) and log_q ``(n,)``."""
        return self.density.sample(n, batch_size=batch_size or self.sample_batch_size)

    # ------------------------------------------------------------------ loss terms shared by families
    def term_nll(self, x: Tensor) -> Tensor:
        """−E_data log q(x) over MD frames ``(B, N, 3)`` nm."""
        return -self.log_prob(x).mean()

    def term_kl(self, x: Tensor) -> Tensor:
        """Reverse KL up to a constant, E_q[u(x) + log q(x)], over ``kl_batch_size`` reparameterised samples with
        the energy cut above ``energy_cut`` kT; non-finite samples are dropped and counted (``train/kl_nonfinite``)."""
        xs, log_q = self.density.rsample(self.hparams.kl_batch_size)
        value = self.training_energy(xs) + log_q
        ok = self._finite(value, "kl")
        return value[ok].mean()

    def term_kl_path(self, x: Tensor) -> Tensor:
        """Reverse KL with the path gradient (Vaitl et al. 2022, "Gradients should stay on path").

        The gradient of E_q[u(x) + log q_θ(x)] has a score part, E_q[∇_θ log q_θ], whose expectation is zero
        but whose variance does not vanish as q approaches the target; the path estimator keeps only
        ∇_x(u + log q)(x) · ∂x/∂θ, which does vanish there. Computed as a surrogate: the gradient g of
        u + log q at the (detached) samples, with the flow's parameters held fixed, then ⟨g, x_θ⟩. The value
        returned has the reverse-KL gradient, its value is E_q[u + log q] (what ``kl`` reports).
        Non-finite samples are dropped and counted (``train/kl_nonfinite``)."""
        xs, _ = self.density.rsample(self.hparams.kl_batch_size)
        xd = xs.detach().requires_grad_(True)
        value = self.training_energy(xd) + self.density.log_prob(xd)
        ok = self._finite(value, "kl_path")
        (g,) = torch.autograd.grad(value[ok].sum(), xd)  # w.r.t. x only: the parameters' gradients untouched
        g = torch.where(ok[:, None, None], g, torch.zeros_like(g))
        surrogate = (g.to(xs.dtype) * xs).sum() / ok.sum()
        return surrogate - surrogate.detach() + value[ok].detach().mean()

    def term_fkl_is(self, x: Tensor) -> Tensor:
        """Forward KL to the target estimated by importance sampling on the flow's own samples: −Σ w̄ log q(x)
        with self-normalised weights w̄ ∝ exp(−u − log q) of ``kl_batch_size`` samples drawn without gradients.
        Mass-covering where the flow puts samples (it pulls probability towards under-weighted regions, where
        the reverse KL would let them go); its gradient is noisy while the ESS is low."""
        with torch.no_grad():
            xs, log_q = self.density.sample(self.hparams.kl_batch_size)
            log_w = -self.training_energy(xs) - log_q
            ok = self._finite(log_w, "fkl_is")
            w = torch.softmax(log_w[ok], dim=0)
        return -(w * self.density.log_prob(xs[ok])).sum()

    # log-weight deviations beyond this many nats count linearly (Huber): a clashing sample 1e6 kT up must
    # not own the gradient
    logvar_huber = 5.0

    def _own_samples_and_data(self, x: Tensor) -> tuple[int, Tensor]:
        """``kl_batch_size`` flow samples drawn without gradients, followed by the data frames ``x``: the number
        of flow samples and log w = −u − log q ``(n + B,)`` (differentiable through log q only). Within a
        training step it is computed once and shared by the terms that use it (``logvar``, ``alpha2``)."""
        cache, key = self._step_cache, ("own_samples_and_data", id(x))
        if cache is not None and key in cache:
            return cache[key]
        with torch.no_grad():
            xs, _ = self.density.sample(self.hparams.kl_batch_size)
            # data frames on the model's coordinates: else frozen side-chain bonds/angles add their MD energy to
            # u of the data alone (hundreds of kT on a protein), a gap no flow can close
            pool = torch.cat([xs, self.on_model_coordinates(x).to(xs.dtype)])
            u = self.training_energy(pool)
        out = len(xs), -u - self.density.log_prob(pool)
        if cache is not None:
            cache[key] = out
        return out

    def term_logvar(self, x: Tensor) -> Tensor:
        """Log-variance divergence (Richter et al. 2020): the spread of log w = −u − log q over ``kl_batch_size``
        flow samples drawn without gradients *and* the data frames ``x``, about its mean (Huber beyond
        ``logvar_huber`` nats). Zero only where q ∝ exp(−u) on both sets. ESS/n ≈ exp(−Var log w) for
        near-lognormal weights, so this is the quantity the ESS reads. On flow samples its gradient is
        the reverse KL's (it pushes q down where q ≫ p, e.g. steric walls); on the data it pulls q up where
        q ≪ p (the rare basins) without the NLL's overfitting: its target there is −u, not a spike."""
        _, log_w = self._own_samples_and_data(x)
        ok = self._finite(log_w, "logvar")
        d = log_w[ok] - log_w[ok].detach().mean()
        return torch.nn.functional.huber_loss(d, torch.zeros_like(d), delta=self.logvar_huber) * 2

    def term_alpha2(self, x: Tensor) -> Tensor:
        """The α = 2 divergence D₂(p‖q) = log E_q[(p/q)²], the objective of FAB (Midgley et al. 2023), by
        importance sampling on the ``kl_batch_size`` flow samples that ``logvar`` uses (drawn without
        gradients, so q_θ/q_old = 1 in value): its gradient is −Σ w̄²ᵢ ∇θ log q(xᵢ) with w̄² ∝ w², which pulls
        q up where the samples are under-weighted: the upper tail of w, which is what sets the ESS
        (n/ESS → E_q[w²]/E_q[w]² = exp D₂). The data frames ``x`` take no part (their state need not be the
        target's). Value: −log(ESS/n) of the batch (nats; 0 when all weights are equal); no AIS, so its
        gradient is only as good as the batch's own ESS — an addition to ``logvar``, not a stage alone."""
        n, log_w = self._own_samples_and_data(x)
        log_w = log_w[:n]
        ok = self._finite(log_w, "alpha2")
        a = log_w[ok]
        b = a.detach()
        surrogate = torch.logsumexp(a + b, dim=0)  # log Σ p̃² / (q_θ q_old): D₂ up to a constant
        minus_log_ess = 2 * torch.logsumexp(b, 0) - torch.logsumexp(2 * b, 0) - math.log(len(b))
        return surrogate - surrogate.detach() - minus_log_ess

    def term_nll_mcmc(self, x: Tensor) -> Tensor:
        """NLL of the flow's own samples after ``mcmc_steps`` Metropolis-adjusted Langevin steps targeting
        exp(−u): the steps leave the target invariant and bring q's samples closer to it (most of all in the
        stiff coordinates a flow gets slightly wrong: bonds, angles), so fitting q to them moves q towards
        the target, with q = target as the fixed point. Mass-covering like the NLL on data, and needs no
        data: an unlimited supply of near-equilibrium frames. Logs ``train/mcmc_acceptance``."""
        from bg.sampling.kernels import MALA
        from bg.sampling.smc import at_target

        n = self.hparams.kl_batch_size
        with torch.no_grad():
            xs, _ = self.density.sample(n)
        particles, accepted = at_target(xs, self.training_energy, MALA(self.hparams.mcmc_step_size),
                                        self.hparams.mcmc_steps)
        if self._trainer is not None and self.hparams.mcmc_steps:
            self.log("train/mcmc_acceptance", accepted / (n * self.hparams.mcmc_steps), on_step=True,
                     on_epoch=False, batch_size=n)
        log_q = self.density.log_prob(particles.x.detach().to(xs.dtype))
        ok = self._finite(log_q, "nll_mcmc")
        return -log_q[ok].mean()

    def _finite(self, value: Tensor, term: str) -> Tensor:
        """The mask of finite per-sample values ``(B,)`` of an energy term; the others are counted
        (``train/kl_nonfinite``) and dropped by the caller; none finite is an error."""
        ok = torch.isfinite(value)
        if self._trainer is not None:
            self.log("train/kl_nonfinite", (~ok).sum().float(), on_step=True, on_epoch=False, batch_size=len(ok))
        if not ok.any():
            raise FloatingPointError(f"every sample of the {term} batch has a non-finite energy or density")
        return ok

    def validation_loss(self, x: Tensor) -> tuple[str, Tensor]:
        """The held-out loss logged as ``val/<name>`` and ``test/<name>`` (default: the NLL)."""
        return "nll", -self.log_prob(x).mean()

    # ------------------------------------------------------------------ Lightning
    def on_train_start(self) -> None:
        if self._resume_rng is not None:
            torch.set_rng_state(self._resume_rng)
            self._resume_rng = None
        # seed_everything gives every DDP rank the same seed: the flow's own samples (w2, kl) would be
        # identical on all ranks. Rank and step enter the seed (a resumed run does not replay samples).
        if self.trainer.world_size > 1:
            seed = hash((torch.initial_seed(), self.trainer.global_rank, self.trainer.global_step))
            torch.manual_seed(seed % 2**63)

    def weighted_loss(self, x: Tensor, weights: dict[str, float] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Σ weight · term(x) over ``weights`` (default: ``loss_weights``; zero weights skipped) as a float32
        scalar, and each term's detached value keyed ``train/<term>``. The terms share their flow samples
        (``logvar`` and ``alpha2`` draw and evaluate one set)."""
        loss = x.new_zeros((), dtype=torch.float32)
        logs = {}
        self._step_cache = {}
        try:
            for name, weight in (self.loss_weights if weights is None else weights).items():
                if weight == 0:
                    continue
                value = getattr(self, f"term_{name}")(x)
                logs[f"train/{name}"] = value.detach()
                loss = loss + weight * value.float()
        finally:
            self._step_cache = None
        return loss, logs

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x = batch[0]
        if self.hparams.augment_rotors:
            x = turn_rotors(x, self.rotors(x))
        loss, logs = self.weighted_loss(x)
        if not self.guard.check_loss(loss, logs, self.global_rank, self.global_step):
            return self.guard.nan_loss(self.parameters())
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=len(x))
        self.log("loss", loss.detach(), prog_bar=True, logger=False, on_step=True, batch_size=len(x))
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Run forward/backward, then step only if the loss and all gradients are finite."""
        self.guard.step(optimizer, optimizer_closure, list(self.parameters()), self.global_rank, self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/skipped_steps", float(self.guard.skipped), on_step=True, on_epoch=False, batch_size=1)
        # this rank's count (under DDP every rank evaluates its own kl_batch_size)
        self.log("train/energy_evaluations", float(self.energy_evaluations), on_step=True, on_epoch=False,
                 batch_size=1)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        name, value = self.validation_loss(batch[0])
        self.log(f"val/{name}", value, prog_bar=True, sync_dist=True, batch_size=len(batch[0]))

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        name, value = self.validation_loss(batch[0])
        self.log(f"test/{name}", value, sync_dist=True, batch_size=len(batch[0]))

    def predict_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self._trainer is not None else 1
        return predict_loader(self.predict_samples, world, self.sample_batch_size, whole=self.sampler is not None)

    def predict_step(self, batch: int, batch_idx: int) -> dict[str, Any]:
        return predict_batch(self.proposal, self.energy, int(batch), self.sampler)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        return opt(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
