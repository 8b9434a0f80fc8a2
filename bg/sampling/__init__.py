"""Samplers that turn proposal samples into (weighted) samples of a target, from energies alone.

The functions take a source energy E0(x) = −log q(x) and a target energy E1(x) = u(x) (both ``(B,
*event)`` → ``(B,)``, differentiable where gradients are needed) and nothing else: no model, no
Lightning. ``importance_sampling`` reweights; ``smc`` transports the particles along the linear path
E_t = (1 − t)·E0 + t·E1 with an MCMC kernel (``kernels``: ULA, MALA), Jarzynski weights and resampling
(Sequential Boltzmann Generators, Tan et al. 2025). The sampler objects (``ImportanceSampler``,
``SMCSampler``) take a ``Proposal`` (a generator's density with its checks) and the target energy:
``sampler(proposal, target, n)``. ``kish_ess`` is the package's one ESS.
"""

from bg.sampling.ess import kish_ess
from bg.sampling.importance import ISResult, importance_sampling
from bg.sampling.kernels import MALA, ULA, Particles, TorsionMove
from bg.sampling.proposal import Energy, LatentProposal, Proposal, batched
from bg.sampling.samplers import ImportanceSampler, Sampler, SMCSampler
from bg.sampling.smc import SMCResult, smc, systematic_resample

__all__ = ["Energy", "ISResult", "ImportanceSampler", "MALA", "LatentProposal", "Particles", "Proposal", "SMCResult", "SMCSampler", "Sampler", "TorsionMove", "ULA",
           "batched", "importance_sampling", "kish_ess", "smc", "systematic_resample"]
