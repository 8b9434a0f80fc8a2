"""Samplers as config objects (``model.sampler`` in YAML, the evaluation callback's ``smc``).

Every sampler has one call signature, ``sampler(proposal, target, n, generator=None, progress=False)``:
a :class:`bg.sampling.Proposal` (the generator), the target energy u ``(B, N, 3)`` nm → ``(B,)`` kT, and
the number of samples. It returns a dict with ``x`` ``(n, N, 3)`` nm, ``log_w`` ``(n,)`` (final log
weights), ``energy_kT`` ``(n,)``, the sampler's ``name`` under ``sampler`` and its statistics (``ess``,
``log_z``, ...)::

    model:
      init_args:
        sampler:
          class_path: bg.sampling.SMCSampler
          init_args: {n_steps: 100, step_size: 1.0e-6, metropolis: true}
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from bg.choices import check_choices
from bg.sampling.importance import importance_sampling
from bg.coordinates.torsions import Torsions, torsion_turns
from bg.sampling.kernels import MALA, ULA, Alternating, LatentMove, TorsionMove
from bg.sampling.proposal import Energy, Proposal, batched
from bg.sampling.smc import Schedule, evaluator, smc

Space = Literal["data", "latent", "both"]


class Sampler:
    """Base of the samplers; ``name`` labels outputs and logged metrics."""

    name = "sampler"

    def __call__(self, proposal: Proposal, target: Energy, n: int, generator: torch.Generator | None = None,
                 progress: bool = False) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} is not a sampler; use bg.sampling.ImportanceSampler or SMCSampler")


class ImportanceSampler(Sampler):
    """Self-normalised importance sampling of proposal samples.

    Args:
        clip_top: clip the largest log-weights to the k-th largest (int k ≥ 1, or a fraction of the
            samples); the number clipped is reported. ``None``: no clipping.
    """

    name = "importance"

    def __init__(self, clip_top: float | None = None):
        if clip_top is not None and clip_top <= 0:
            raise ValueError(f"ImportanceSampler.clip_top must be positive, got {clip_top}")
        self.clip_top = clip_top

    def __call__(self, proposal: Proposal, target: Energy, n: int, generator: torch.Generator | None = None,
                 progress: bool = False) -> dict[str, Any]:
        """``n`` proposal samples with their (clipped) weights, ``log_q``, the checks' flags, ``ess``, ``log_z``,
        ``n_clipped`` and ``n_rejected`` (non-finite energy or dropped by the checks)."""
        out = proposal.weigh(n, target)
        e0 = -out["log_q"].double()
        if "valid" in out:  # samples a family's checks dropped (chirality, topology) weigh zero
            e0 = e0.masked_fill(~out["valid"].to(e0.device), -math.inf)
        res = importance_sampling(e0, out["energy_kT"], self.clip_top)
        return dict(out, log_w=res.log_w, sampler=self.name, ess=res.ess, log_z=res.log_z,
                    n_clipped=res.n_clipped, n_rejected=res.n_rejected)


class SMCSampler(Sampler):
    """Annealed-Langevin SMC from the proposal to the target (``bg.sampling.smc``).

    Args:
        n_steps: path points t_1 … t_K = 1.
        langevin_steps: Langevin steps per path point.
        step_size: h of x' = x − h∇E_t + √(2h)ξ in the generator's particle space (Cartesian nm² for
            every family: ~1e-6 nm² suits hydrogen-containing molecules, whose stiffest bonds allow
            at most ~2e-5 nm² before the unadjusted dynamics blow up).
        metropolis: Metropolis-adjusted Langevin (``MALA``, exact at every t; slower mixing at large h);
            ``False``: unadjusted (``ULA``).
        ess_threshold: resample when ESS/n drops below this.
        energy_cut: particles above this target energy (kT) get weight 0 (reported as rejection rate).
        batch_size: particles per energy/gradient evaluation (memory); ``None``: all at once.
        schedule: ``linear`` (t_k = k / n_steps) or ``adaptive`` (each next t keeps the conditional ESS at
            ``target_cess``; ``n_steps`` bounds the number of points; ``bg.sampling.smc``).
        target_cess: conditional ESS / n per adaptive step.
        space: where the particles move: ``data`` (the generator's own particle space, Cartesian nm) or
            ``latent`` (its flow's latent variables, TarFlow and NSF: the flow preconditions the moves, so
            ``step_size`` is in latent units², 1e-3–1e-2 for the alanine-dipeptide TarFlow instead of ~2e-6 nm²;
            the NSF's latent units are its base's spreads per coordinate; ``bg.sampling.proposal``) or ``both``
            (data-space particles; each Langevin step is a latent move of ``latent_step_size`` then a data-space
            move of ``step_size``; body-frame TarFlow only).
        latent_step_size: h of the latent moves with ``space: both`` (latent units²; required there).
        torsion_moves: Metropolis torsion turns after each Langevin step (``bg.sampling.kernels.TorsionMove``; 0:
            none). They move conformational basins, which Langevin steps sized for the bonds do not; they need
            Cartesian particles (``space: data`` or ``both``) and the proposal's topology.
        torsions: which bonds they turn: ``backbone`` (φ, ψ) or ``rotatable`` (every non-ring, non-planar bond;
            ``bg.coordinates.torsions``).
        torsion_max_angle: turns are uniform in [−max, max] rad (π: any angle).
    """

    name = "smc"

    def __init__(self, n_steps: int = 100, langevin_steps: int = 1, step_size: float = 1e-6, metropolis: bool = True,
                 ess_threshold: float = 0.5, energy_cut: float | None = None, batch_size: int | None = None,
                 schedule: Schedule = "linear", target_cess: float = 0.95, space: Space = "data",
                 latent_step_size: float | None = None, torsion_moves: int = 0, torsions: Torsions = "backbone",
                 torsion_max_angle: float = math.pi):
        if n_steps < 1 or langevin_steps < 0 or step_size <= 0:
            raise ValueError("SMCSampler: n_steps ≥ 1, langevin_steps ≥ 0 and step_size > 0 are required")
        check_choices(SMCSampler.__init__, dict(schedule=schedule, space=space, torsions=torsions), "SMCSampler ")
        if torsion_moves < 0 or not 0 < torsion_max_angle <= math.pi:
            raise ValueError(f"SMCSampler: torsion_moves ≥ 0 and 0 < torsion_max_angle ≤ π are required, got "
                             f"{torsion_moves}, {torsion_max_angle}")
        if torsion_moves and space == "latent":
            raise ValueError("SMCSampler: torsion moves turn Cartesian frames; they need space: data or both, not "
                             "latent (set torsion_moves: 0 for space: latent)")
        if not 0 < target_cess < 1:
            raise ValueError(f"SMCSampler: target_cess must lie in (0, 1), got {target_cess}")
        self.n_steps, self.langevin_steps, self.step_size = n_steps, langevin_steps, step_size
        self.metropolis, self.ess_threshold, self.energy_cut = metropolis, ess_threshold, energy_cut
        self.batch_size, self.schedule, self.target_cess, self.space = batch_size, schedule, target_cess, space
        if space == "both" and (latent_step_size is None or latent_step_size <= 0):
            raise ValueError("SMCSampler with space: both needs latent_step_size > 0 (latent units², e.g. 3.0e-3)")
        self.latent_step_size = latent_step_size
        self.torsion_moves, self.torsions, self.torsion_max_angle = torsion_moves, torsions, torsion_max_angle

    def kernels(self, proposal: Proposal, target: Energy) -> dict[str, ULA | LatentMove | TorsionMove]:
        """The MCMC moves of one Langevin step for ``proposal`` (whose particle space is already the chosen one),
        by label (``latent``, ``data``, ``torsion``), in the order they run."""
        make = MALA if self.metropolis else ULA
        moves: dict = {}
        if self.space == "both":
            latent = proposal.latent()
            proposal.require_to_latent()
            moves["latent"] = LatentMove(make(self.latent_step_size), proposal.to_latent, latent.frames,
                                         evaluator(lambda z: -latent.log_prob(z), latent.target(target), self.batch_size))
        moves["data" if self.space != "latent" else "latent"] = make(self.step_size)
        if self.torsion_moves:
            if proposal.topology is None:
                raise ValueError(f"{proposal.name} does not know its molecule's topology, which torsion moves need; "
                                 "set torsion_moves: 0")
            moves["torsion"] = TorsionMove(torsion_turns(proposal.topology, self.torsions), self.torsion_moves,
                                           self.torsion_max_angle)
        return moves

    def __call__(self, proposal: Proposal, target: Energy, n: int, generator: torch.Generator | None = None,
                 progress: bool = False) -> dict[str, Any]:
        """``n`` particles moved from the proposal to the target, their final weights and the run's statistics
        (ESS history, resampling times, acceptance, rejection rate, ``n_ancestors``)."""
        if not proposal.differentiable:
            raise ValueError(f"{proposal.name} does not support SMC: the Langevin moves need ∇ log q, which this "
                             "generator does not provide; use sampler: null or bg.sampling.ImportanceSampler")
        if self.space == "latent":
            proposal = proposal.latent()
        moves = self.kernels(proposal, target)
        kernel = next(iter(moves.values())) if len(moves) == 1 else Alternating(list(moves.values()))
        # SMC needs gradients; Lightning's predict and validation loops run in inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            res = smc(proposal.particles(n), lambda s: -proposal.log_prob(s), proposal.target(target),
                      n_steps=self.n_steps, langevin_steps=self.langevin_steps, step_size=self.step_size,
                      ess_threshold=self.ess_threshold, energy_cut=self.energy_cut, batch_size=self.batch_size,
                      generator=generator, progress=progress, kernel=kernel, schedule=self.schedule,
                      target_cess=self.target_cess)
        x = proposal.frames(res.x).double()
        with torch.no_grad():
            u = batched(target, x, proposal.batch_size)
        out = dict(x=x, log_w=res.log_w, energy_kT=u, sampler=self.name, ess=res.ess, log_z=res.log_z,
                   ess_history=res.ess_history, path=res.path, resampled_at=res.resampled_at, acceptance=res.acceptance,
                   n_rejected=res.n_rejected, rejection_rate=res.rejection_rate, n_ancestors=res.n_ancestors)
        if isinstance(kernel, Alternating):  # e.g. latent, then data-space moves, then torsion turns
            out.update({f"acceptance_{label}": a for label, a in zip(moves, kernel.acceptance)})
        return out
