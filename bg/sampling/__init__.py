"""Samplers that turn proposal samples into (weighted) samples of a target, from energies alone.

Each sampler takes a source energy E0(x) = −log q(x) and a target energy E1(x) = u(x) (both ``(B,
*event)`` → ``(B,)``, differentiable where gradients are needed) and nothing else: no model, no
Lightning. ``importance_sampling`` reweights; ``smc`` transports the particles along the linear path
E_t = (1 − t)·E0 + t·E1 with Langevin moves, Jarzynski weights and resampling (Sequential Boltzmann
Generators, Tan et al. 2025).
"""

from bg.sampling.importance import ISResult, importance_sampling
from bg.sampling.samplers import ImportanceSampler, Sampler, SMCSampler
from bg.sampling.smc import SMCResult, smc, systematic_resample

__all__ = ["ISResult", "ImportanceSampler", "SMCResult", "SMCSampler", "Sampler", "importance_sampling", "smc",
           "systematic_resample"]
