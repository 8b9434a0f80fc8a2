"""MCMC kernels that leave exp(−E_t) invariant, E_t = (1 − t)·E0 + t·E1, used by the SMC loop.

A kernel moves a :class:`Particles` population one step. It never evaluates the energies itself:
``evaluate(x) -> (E0, E1, ∇E0, ∇E1)`` (``evaluate(x, grad=False)``: energies only) is handed in by the loop
(which chunks the particles), and the two gradients are kept apart so that one evaluation gives ∇E_t for any t.

- :class:`ULA`: unadjusted Langevin, x' = x − h ∇E_t(x) + √(2h) ξ (biased at finite h).
- :class:`MALA`: the same proposal with a Metropolis–Hastings correction (exact at every t).
- :class:`LatentMove`: a kernel run in a flow's latent space z (x = f(z)) on particles that live in data space:
  exp(−E_t) pulled back through f is exp(−E_t(f(z)) + log|det ∂x/∂z|), so a move that keeps that invariant in z
  keeps exp(−E_t) invariant in x.
- :class:`TorsionMove`: Metropolis moves that turn one side of a random rotatable bond by a random angle
  (``bg.coordinates.torsions``): volume-preserving and symmetric, so only E_t decides; they cross torsional
  barriers (conformational basins) that Langevin moves do not.
- :class:`Alternating`: several kernels one after the other (e.g. latent moves for the slow, collective
  coordinates, then Cartesian moves for the bonds the flow has wrong); each leaves exp(−E_t) invariant, so does
  their composition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from bg.coordinates.torsions import TorsionTurns

#: ``evaluate(x, grad=True) -> (E0, E1, ∇E0, ∇E1)``; with ``grad=False`` the gradients are ``None`` (no backward pass)
Evaluate = Callable[..., tuple[Tensor, Tensor, Tensor | None, Tensor | None]]


@dataclass
class Particles:
    """A population: positions ``x`` ``(n, *event)``, source/target energies ``e0``, ``e1`` ``(n,)`` and
    their gradients ``g0``, ``g1`` (``None`` when no kernel needs them)."""

    x: Tensor
    e0: Tensor
    e1: Tensor
    g0: Tensor | None = None
    g1: Tensor | None = None

    def select(self, idx: Tensor) -> "Particles":
        """The particles at ``idx`` (resampling)."""
        return Particles(*(None if v is None else v[idx] for v in (self.x, self.e0, self.e1, self.g0, self.g1)))

    def where(self, keep_new: Tensor, new: "Particles") -> "Particles":
        """Per particle, ``new`` where ``keep_new`` ``(n,)`` is True, else self."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(new, f.name)
            out.append(torch.where(keep_new.view((-1,) + (1,) * (a.dim() - 1)), b, a))
        return Particles(*out)


class ULA:
    """Unadjusted Langevin step with step size ``step_size`` (h, in the particle space's units²)."""

    #: whether steps are accepted/rejected (an acceptance rate is then meaningful)
    adjusted = False

    def __init__(self, step_size: float):
        if step_size <= 0:
            raise ValueError(f"Langevin step_size must be > 0, got {step_size}")
        self.step_size = step_size

    def propose(self, p: Particles, t: float, evaluate: Evaluate,
                generator: torch.Generator | None) -> tuple[Particles, Tensor]:
        """Langevin proposal from ``p`` at path time ``t``: the moved particles and ∇E_t at ``p``."""
        g = (1 - t) * p.g0 + t * p.g1
        noise = torch.randn(p.x.shape, generator=generator, dtype=p.x.dtype, device=p.x.device)
        x_new = p.x - self.step_size * g.to(p.x.dtype) + math.sqrt(2 * self.step_size) * noise
        return Particles(x_new, *evaluate(x_new)), g

    def step(self, p: Particles, t: float, evaluate: Evaluate,
             generator: torch.Generator | None = None) -> tuple[Particles, int]:
        """One move of every particle; returns the particles and how many proposals were accepted."""
        new, _ = self.propose(p, t, evaluate, generator)
        return new, len(p.x)


class MALA(ULA):
    """Metropolis-adjusted Langevin: the ULA proposal accepted with the MH probability for exp(−E_t)."""

    adjusted = True

    def step(self, p: Particles, t: float, evaluate: Evaluate,
             generator: torch.Generator | None = None) -> tuple[Particles, int]:
        new, g = self.propose(p, t, evaluate, generator)
        h, n = self.step_size, len(p.x)
        flat = lambda v: v.reshape(n, -1).double()  # noqa: E731
        g_new = (1 - t) * new.g0 + t * new.g1
        e_t, e_t_new = (1 - t) * p.e0 + t * p.e1, (1 - t) * new.e0 + t * new.e1
        fwd = flat(new.x - p.x + h * g).square().sum(1) / (4 * h)
        bwd = flat(p.x - new.x + h * g_new).square().sum(1) / (4 * h)
        log_alpha = -(e_t_new - e_t) - bwd + fwd
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=p.x.device)
        accept = torch.isfinite(e_t_new) & (torch.log(u) < log_alpha)
        return p.where(accept, new), int(accept.sum())


class LatentMove:
    """``kernel`` applied in a flow's latent space to data-space particles (see module docstring).

    Args:
        kernel: the move in latent space (``MALA`` or ``ULA``; its step size is in latent units²).
        to_latent: data particles ``(n, *event)`` → latent ``(n, *latent)`` (the flow's inverse map, no gradients).
        from_latent: latent → data particles (no gradients).
        latent_evaluate: ``z -> (E0, E1, ∇E0, ∇E1)`` of the pulled-back energies, E0 = −log base(z) and
            E1 = u(f(z)) − log|det ∂x/∂z| (their difference is the data-space E1 − E0 at x = f(z)).
    """

    def __init__(self, kernel: ULA, to_latent: Callable[[Tensor], Tensor], from_latent: Callable[[Tensor], Tensor],
                 latent_evaluate: Evaluate):
        self.kernel, self.to_latent, self.from_latent, self.latent_evaluate = kernel, to_latent, from_latent, latent_evaluate
        self.adjusted = kernel.adjusted

    def step(self, p: Particles, t: float, evaluate: Evaluate,
             generator: torch.Generator | None = None) -> tuple[Particles, int]:
        z = self.to_latent(p.x)
        moved, accepted = self.kernel.step(Particles(z, *self.latent_evaluate(z)), t, self.latent_evaluate, generator)
        x = self.from_latent(moved.x).to(p.x.dtype)
        return Particles(x, *evaluate(x)), accepted


class TorsionMove:
    """``moves`` Metropolis moves per step, each turning one bond of ``turns`` (drawn uniformly per particle) by an
    angle uniform in [−``max_angle``, ``max_angle``] rad, accepted with min(1, exp(−ΔE_t)) (module docstring).
    Particles are Cartesian frames ``(n, N, 3)`` (nm; a centre of mass they carry moves with the atoms).
    ``step`` returns the mean number accepted per move, so the loop's acceptance stays a rate."""

    adjusted = True

    def __init__(self, turns: TorsionTurns, moves: int = 1, max_angle: float = math.pi):
        if moves < 1 or not 0 < max_angle <= math.pi:
            raise ValueError(f"TorsionMove: moves ≥ 1 and 0 < max_angle ≤ π needed, got {moves}, {max_angle}")
        self.turns, self.moves, self.max_angle = turns, moves, max_angle

    def step(self, p: Particles, t: float, evaluate: Evaluate,
             generator: torch.Generator | None = None) -> tuple[Particles, int]:
        n, n_atoms = len(p.x), self.turns.moving.shape[1]
        if p.x.dim() != 3 or p.x.shape[1:] != (n_atoms, 3):
            raise ValueError(f"TorsionMove turns Cartesian frames (n, {n_atoms}, 3); got particles {tuple(p.x.shape)} "
                             "(latent-space particles cannot be turned: use space: data or both)")
        accepted, moved = 0, torch.zeros(n, dtype=torch.bool, device=p.x.device)
        for _ in range(self.moves):
            rotor = torch.randint(len(self.turns), (n,), generator=generator, device=p.x.device)
            angle = (2 * torch.rand(n, generator=generator, dtype=torch.float64, device=p.x.device) - 1) * self.max_angle
            x_new = self.turns.turn(p.x, rotor, angle)
            # energies alone here (no backward pass); the gradients of the moved particles are refreshed below
            new = Particles(x_new, *evaluate(x_new, grad=False)[:2], p.g0, p.g1)
            e_t, e_t_new = (1 - t) * p.e0 + t * p.e1, (1 - t) * new.e0 + t * new.e1
            u = torch.rand(n, generator=generator, dtype=torch.float64, device=p.x.device)
            accept = torch.isfinite(e_t_new) & (torch.log(u) < -(e_t_new - e_t))
            p = p.where(accept, new)
            accepted, moved = accepted + int(accept.sum()), moved | accept
        if p.g0 is not None and moved.any():
            idx = moved.nonzero().flatten()
            _, _, g0, g1 = evaluate(p.x[idx])
            p.g0, p.g1 = p.g0.index_put((idx,), g0), p.g1.index_put((idx,), g1)
        return p, round(accepted / self.moves)


class Alternating:
    """The kernels ``kernels`` one after the other at each step; ``accepted`` keeps each one's total of accepted
    proposals (``step`` returns their mean, so that the loop's acceptance rate stays a rate)."""

    def __init__(self, kernels: list):
        if not kernels:
            raise ValueError("Alternating needs at least one kernel")
        self.kernels = list(kernels)
        self.adjusted = all(k.adjusted for k in self.kernels)
        self.accepted = [0] * len(self.kernels)
        self.proposed = 0

    def step(self, p: Particles, t: float, evaluate: Evaluate,
             generator: torch.Generator | None = None) -> tuple[Particles, int]:
        total = 0
        for i, kernel in enumerate(self.kernels):
            p, accepted = kernel.step(p, t, evaluate, generator)
            self.accepted[i] += accepted
            total += accepted
        self.proposed += len(p.x)
        return p, round(total / len(self.kernels))

    @property
    def acceptance(self) -> list[float | None]:
        """Each kernel's acceptance rate so far (``None`` for an unadjusted kernel or before any step)."""
        return [a / self.proposed if self.proposed and k.adjusted else None
                for a, k in zip(self.accepted, self.kernels)]
