"""Sampler settings as config objects (``model.sampler`` in YAML) around the sampling functions.

``lightning predict`` and the evaluation callback take one of these; the generator supplies the
particles and the two energies (``BoltzmannGenerator.run_sampler``), the sampler nothing else::

    model:
      init_args:
        sampler:
          class_path: bg.sampling.SMCSampler
          init_args: {n_steps: 100, step_size: 1.0e-6, metropolis: true}
"""

from __future__ import annotations

import torch
from torch import Tensor

from bg.sampling.importance import ISResult, importance_sampling
from bg.sampling.smc import Energy, SMCResult, smc


class Sampler:
    """Base of the sampler settings; ``name`` labels outputs and logged metrics."""

    name = "sampler"


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

    def __call__(self, source_energy: Tensor, target_energy: Tensor) -> ISResult:
        """Weights from the energies ``(n,)`` of the samples: E0 = −log q, E1 = u."""
        return importance_sampling(source_energy, target_energy, self.clip_top)


class SMCSampler(Sampler):
    """Annealed-Langevin SMC from the proposal to the target (``bg.sampling.smc``).

    Args:
        n_steps: path points t_1 … t_K = 1.
        langevin_steps: Langevin steps per path point.
        step_size: h of x' = x − h∇E_t + √(2h)ξ in the generator's particle space (Cartesian nm² for
            every family: ~1e-6 nm² suits hydrogen-containing molecules, whose stiffest bonds allow
            at most ~2e-5 nm² before the unadjusted dynamics blow up).
        metropolis: Metropolis-adjusted Langevin (exact at every t; slower mixing at large h).
        ess_threshold: resample when ESS/n drops below this.
        energy_cut: particles above this target energy (kT) get weight 0 (reported as rejection rate).
        batch_size: particles per energy/gradient evaluation (memory); ``None``: all at once.
    """

    name = "smc"

    def __init__(self, n_steps: int = 100, langevin_steps: int = 1, step_size: float = 1e-6, metropolis: bool = True,
                 ess_threshold: float = 0.5, energy_cut: float | None = None, batch_size: int | None = None):
        if n_steps < 1 or langevin_steps < 0 or step_size <= 0:
            raise ValueError("SMCSampler: n_steps ≥ 1, langevin_steps ≥ 0 and step_size > 0 are required")
        self.n_steps, self.langevin_steps, self.step_size = n_steps, langevin_steps, step_size
        self.metropolis, self.ess_threshold, self.energy_cut = metropolis, ess_threshold, energy_cut
        self.batch_size = batch_size

    def __call__(self, x: Tensor, source_energy: Energy, target_energy: Energy,
                 generator: torch.Generator | None = None, progress: bool = False) -> SMCResult:
        """Run SMC from proposal particles ``x`` with E0 = ``source_energy`` and E1 = ``target_energy``."""
        return smc(x, source_energy, target_energy, n_steps=self.n_steps, langevin_steps=self.langevin_steps,
                   step_size=self.step_size, metropolis=self.metropolis, ess_threshold=self.ess_threshold,
                   energy_cut=self.energy_cut, batch_size=self.batch_size, generator=generator, progress=progress)
