"""What samplers draw from: a generator seen as a proposal, apart from the model that trained it.

A :class:`Proposal` wraps a Cartesian density (``bg.flows.CartesianDensity``: ``sample(n) -> (x,
log_q)``, ``log_prob(x)``) with what sampling needs besides it:

- ``sample(n)``: frames ``x`` ``(n, N, 3)`` nm (float64) with ``log_q`` ``(n,)``, drawn without gradients in
  batches of ``batch_size``, passed through the family's sample ``checks`` (which may fix frames, e.g.
  mirror them, and return boolean per-sample flags; a ``valid`` flag drops samples: weight 0);
- the particle space SMC moves in: ``particles(n)``, the differentiable source density
  ``log_prob(s)``, ``frames(s)`` (Cartesian nm) and ``target(u)``, the target energy expressed on
  particles. By default particles are Cartesian frames and the target is u itself; a family whose
  flow lives on a larger space (TarFlow's CoM) overrides these four.

``differentiable`` says whether ∇ log q exists (SMC needs it; a CNF whose log q comes from an ODE solve
does not provide it).

``latent()`` gives the same generator as a :class:`LatentProposal`, whose particles are the flow's latent
variables z (x = f(z)): the source is the flow's base density and the target u(f(z)) − log|det ∂x/∂z|, whose
push-forward is exp(−u). Langevin moves there see the target through the flow ("neural transport", Hoffman et
al. 2019): as far as the flow has learned the stiff directions (bond lengths), steps can be far larger than in
Cartesian space; where it has them wrong, the latent coordinates are as stiff (bench/results/tarflow_stages.md).
The incremental SMC weights are unchanged: E1 − E0 = u(x) + log q(x) in either space. Where the flow also maps
frames to latents (``to_latent``, the TarFlow's parallel forward pass), SMC can keep its particles in data space
and alternate latent and Cartesian moves (``SMCSampler(space="both")``, ``bg.sampling.kernels.LatentMove``).
"""

from __future__ import annotations

import math
from typing import Callable

import mdtraj as md
import torch
from torch import Tensor, nn

Energy = Callable[[Tensor], Tensor]
#: (frames, log_q) -> (frames, log_q, flags): a family's checks of generated frames
Checks = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]


def batched(fn: Energy, x: Tensor, batch_size: int) -> Tensor:
    """``fn`` over ``x`` in chunks of ``batch_size`` rows, concatenated."""
    return torch.cat([fn(c) for c in x.split(batch_size)])


class Proposal:
    """A Cartesian density as samplers see it (see module docstring).

    Args:
        density: ``sample(n, batch_size=...) -> (x, log_q)`` and ``log_prob(x)``, Cartesian nm.
        batch_size: samples per batch when drawing and when evaluating energies.
        checks: the family's checks of generated frames (``None``: none).
        differentiable: whether ``log_prob`` has gradients with respect to x.
        name: label in error messages.
        topology: the molecule's ``mdtraj.Topology`` (moves that turn torsions need its bonds); ``None``: unknown.
    """

    def __init__(self, density: nn.Module, batch_size: int = 1000, checks: Checks | None = None,
                 differentiable: bool = True, name: str = "generator", topology: md.Topology | None = None):
        self.density, self.batch_size, self.checks = density, batch_size, checks
        self.differentiable, self.name, self.topology = differentiable, name, topology

    def sample(self, n: int, batch_size: int | None = None) -> dict[str, Tensor]:
        """``x`` ``(n, N, 3)`` nm (float64), ``log_q`` ``(n,)`` and the checks' flags, drawn in batches of
        ``batch_size`` (default: the proposal's)."""
        x, log_q = self.density.sample(n, batch_size=batch_size or self.batch_size)
        flags: dict[str, Tensor] = {}
        if self.checks is not None:
            x, log_q, flags = self.checks(x, log_q)
        return dict(x=x, log_q=log_q, **flags)

    def weigh(self, n: int, target: Energy, batch_size: int | None = None) -> dict[str, Tensor]:
        """``sample(n, batch_size)`` plus ``energy_kT`` = u(x) and ``log_w`` = −u − log q (−inf for samples the
        checks dropped): importance-weighted samples of exp(−u)."""
        out = self.sample(n, batch_size)
        with torch.no_grad():
            u = batched(target, out["x"], self.batch_size)
        log_w = -u - out["log_q"].double()
        if "valid" in out:
            log_w = log_w.masked_fill(~out["valid"].to(log_w.device), -math.inf)
        return dict(out, energy_kT=u, log_w=log_w)

    # ------------------------------------------------------------------ the particle space of SMC
    @torch.no_grad()
    def particles(self, n: int) -> Tensor:
        """``n`` proposal particles (float64) in the space SMC moves them in (here: Cartesian frames, nm)."""
        return self.density.sample(n, batch_size=self.batch_size)[0]

    def log_prob(self, s: Tensor) -> Tensor:
        """log q of particles ``(B, ...)`` → ``(B,)``, differentiable (up to a constant)."""
        return self.density.log_prob(s)

    def frames(self, s: Tensor) -> Tensor:
        """Cartesian frames ``(B, N, 3)`` nm of particles."""
        return s

    def target(self, u: Energy) -> Energy:
        """The target energy on particles (kT), whose frame marginal is exp(−u)."""
        return u

    def require_to_latent(self) -> None:
        """Raise unless ``to_latent`` works for this generator."""
        if not getattr(self.density, "has_to_latent", False):
            raise ValueError(f"{self.name} cannot map its particles to its flow's latent space; moves that alternate "
                             "latent and data space need a flow with to_latent (the body-frame TarFlow); use space: "
                             "data or latent")

    @torch.no_grad()
    def to_latent(self, s: Tensor) -> Tensor:
        """Particles → the flow's latent variables (batched, no gradients)."""
        self.require_to_latent()
        return batched(lambda c: self.density.to_latent(self.frames(c)), s, self.batch_size)

    def latent(self) -> "LatentProposal":
        """This generator with its flow's latent variables as the particle space (see module docstring)."""
        if not getattr(self.density, "has_latent", False):
            raise ValueError(f"{self.name} does not expose its flow's latent space; SMC in latent space needs a flow "
                             "with from_latent (the TarFlow, the NSFs); use space: data")
        return LatentProposal(self.density, self.batch_size, self.checks, self.differentiable, self.name, self.topology)


class LatentProposal(Proposal):
    """A generator whose SMC particles are its flow's latent variables (see module docstring)."""

    @torch.no_grad()
    def particles(self, n: int) -> Tensor:
        bs = self.batch_size
        return torch.cat([self.density.sample_latent(min(bs, n - i)) for i in range(0, n, bs)])

    def log_prob(self, s: Tensor) -> Tensor:
        return self.density.latent_log_prob(s)

    @torch.no_grad()
    def frames(self, s: Tensor) -> Tensor:
        return batched(lambda z: self.density.from_latent(z)[0], s, self.batch_size)

    def target(self, u: Energy) -> Energy:
        def energy(s: Tensor) -> Tensor:
            x, log_det = self.density.from_latent(s)
            return u(x) - log_det
        return energy

    def latent(self) -> "LatentProposal":
        return self
