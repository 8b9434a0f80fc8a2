"""Sequential Monte Carlo with annealed Langevin moves from a proposal to a target (Jarzynski weights).

The particles start as samples of the source q (E0 = −log q) and are moved along the linear path
E_t = (1 − t)·E0 + t·E1 for t_1 … t_K = 1/K … 1. At each t_k the log-weights gain the Jarzynski
increment −(t_k − t_{k−1})·(E1(x) − E0(x)) at the current particles, the particles are resampled
(systematic) when the ESS falls below ``ess_threshold``, and Langevin steps leave exp(−E_{t_k})
invariant (unadjusted, or with a Metropolis correction). The loop ends at t_K = 1, the target; the
public SBG code iterated ``timesteps[:-1]`` and stopped one step short at (K − 1)/K.

Estimates: E_p[f] ≈ Σ w_i f(x_i) / Σ w_i with the final weights; log Z1/Z0 accumulates
log mean(w) over the resampling epochs (unbiased for Z1/Z0 itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

Energy = Callable[[Tensor], Tensor]


@dataclass
class SMCResult:
    """Attributes:
        x: final particles ``(n, *event)``.
        log_w: their log-weights ``(n,)`` (float64, relative; −inf: rejected by the energy cut).
        log_z: estimate of log Z1/Z0.
        ess: Kish ESS / n of the final weights.
        ess_history: ESS / n before each resampling decision (K values).
        resampled_at: the t at which the particles were resampled.
        acceptance: mean Metropolis acceptance of the Langevin steps (None when unadjusted).
        n_rejected: particle evaluations removed by the energy cut (or non-finite energy).
        rejection_rate: ``n_rejected`` / (n · (K · langevin_steps + 1)) evaluations.
        n_ancestors: distinct initial particles the final particles descend from (resampling copies
            particles; far fewer ancestors than particles means the population collapsed onto a few
            proposals, whose coarse features, e.g. conformational basins, the result then inherits).
    """

    x: Tensor
    log_w: Tensor
    log_z: float
    ess: float
    ess_history: list[float] = field(default_factory=list)
    resampled_at: list[float] = field(default_factory=list)
    acceptance: float | None = None
    n_rejected: int = 0
    rejection_rate: float = 0.0
    n_ancestors: int = 0

    @property
    def weights(self) -> Tensor:
        """Self-normalised weights ``(n,)``."""
        return torch.softmax(self.log_w, 0)


def _ess(log_w: Tensor) -> float:
    w = torch.softmax(log_w, 0)
    return float(1.0 / (w.square().sum() * len(w)))


def systematic_resample(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Indices ``(n,)`` of systematic resampling with normalised ``weights`` ``(n,)``: one uniform
    offset, n evenly spaced positions through the cumulative weights (lowest variance of the usual schemes)."""
    n = len(weights)
    u0 = torch.rand((), generator=generator, dtype=torch.float64, device=weights.device)
    positions = (torch.arange(n, dtype=torch.float64, device=weights.device) + u0) / n
    cumulative = torch.cumsum(weights.double(), 0)
    cumulative[-1] = 1.0
    return torch.searchsorted(cumulative, positions).clamp_(max=n - 1)


def _energies_chunk(x: Tensor, source: Energy, target: Energy, grad: bool):
    x = x.detach().requires_grad_(grad)
    with torch.enable_grad() if grad else torch.no_grad():
        e0, e1 = source(x).double(), target(x).double()
        if not grad:
            return e0, e1, None, None
        grads = []
        for e in (e0, e1):
            (g,) = torch.autograd.grad(torch.where(torch.isfinite(e), e, 0.0).sum(), x, retain_graph=e is e0)
            grads.append(torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0))
    return e0.detach(), e1.detach(), grads[0], grads[1]


def _energies(x: Tensor, source: Energy, target: Energy, grad: bool, batch_size: int | None):
    """E0, E1 ``(n,)`` and (with ``grad``) ∇E0, ∇E1 ``(n, *event)``, in chunks of ``batch_size`` particles.
    Keeping the two gradients apart gives ∇E_t for any t from one evaluation."""
    if batch_size is None or len(x) <= batch_size:
        return _energies_chunk(x, source, target, grad)
    parts = [_energies_chunk(c, source, target, grad) for c in x.split(batch_size)]
    return tuple(torch.cat([p[i] for p in parts]) if parts[0][i] is not None else None for i in range(4))


def smc(x: Tensor, source_energy: Energy, target_energy: Energy, n_steps: int = 100, langevin_steps: int = 1,
        step_size: float = 1e-3, metropolis: bool = False, ess_threshold: float = 0.5,
        energy_cut: float | None = None, batch_size: int | None = None, generator: torch.Generator | None = None,
        progress: bool = False) -> SMCResult:
    """Transport samples ``x`` ``(n, *event)`` of q toward exp(−E1) (see module docstring).

    Args:
        x: proposal samples (e.g. flow samples, Cartesian nm).
        source_energy: E0(x) = −log q(x) ``(B, *event)`` → ``(B,)``, differentiable.
        target_energy: E1(x) = u(x) in kT, differentiable.
        n_steps: K, the number of path points t_1 … t_K (= 1).
        langevin_steps: Langevin steps per path point.
        step_size: h in x' = x − h ∇E_t(x) + √(2h) ξ.
        metropolis: accept/reject each step (MALA), making every step exact for exp(−E_t).
        ess_threshold: resample when ESS / n falls below this (1: every step; 0: never).
        energy_cut: particles whose target energy exceeds this (kT), or is not finite, get weight 0.
        batch_size: particles per energy/gradient evaluation (bounds memory); ``None``: all at once.
        generator: random stream of the noise and of resampling.
        progress: show a progress bar over the path points (stderr).
    """
    if n_steps < 1 or langevin_steps < 0 or step_size <= 0:
        raise ValueError("smc: n_steps ≥ 1, langevin_steps ≥ 0 and step_size > 0 are required")
    n = x.shape[0]
    x = x.detach()
    ts = torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64).tolist()
    grad = langevin_steps > 0
    e0, e1, g0, g1 = _energies(x, source_energy, target_energy, grad, batch_size)
    log_w = torch.zeros(n, dtype=torch.float64, device=x.device)
    n_rejected = 0

    def reject(e1: Tensor, log_w: Tensor) -> tuple[Tensor, int]:
        bad = ~torch.isfinite(e1)
        if energy_cut is not None:
            bad |= e1 > energy_cut
        return log_w.masked_fill(bad, -math.inf), int(bad.sum())

    log_w, k_bad = reject(e1, log_w)
    n_rejected += k_bad
    log_z, ess_history, resampled_at, accepted, proposed = 0.0, [], [], 0, 0
    shape = (n,) + (1,) * (x.dim() - 1)
    ancestor = torch.arange(n, device=x.device)
    flat = lambda v: v.reshape(n, -1).double()  # noqa: E731
    for k in tqdm(range(1, n_steps + 1), desc="SMC", disable=not progress, leave=False):
        t, dt = ts[k], ts[k] - ts[k - 1]
        log_w = log_w - dt * torch.nan_to_num(e1 - e0, nan=math.inf, posinf=math.inf)
        if not torch.isfinite(log_w).any():
            raise FloatingPointError(f"smc: every particle has weight 0 at t={t:.3f} (energy cut or non-finite "
                                     "energies); raise energy_cut, lower step_size or start from better proposals")
        ess = _ess(log_w)
        ess_history.append(ess)
        if ess < ess_threshold:
            log_z += float(torch.logsumexp(log_w, 0)) - math.log(n)
            idx = systematic_resample(torch.softmax(log_w, 0), generator)
            x, e0, e1, ancestor = x[idx], e0[idx], e1[idx], ancestor[idx]
            if grad:
                g0, g1 = g0[idx], g1[idx]
            log_w = torch.zeros_like(log_w)
            resampled_at.append(t)
        for _ in range(langevin_steps):
            g = (1 - t) * g0 + t * g1
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x_new = x - step_size * g.to(x.dtype) + math.sqrt(2 * step_size) * noise
            e0_new, e1_new, g0_new, g1_new = _energies(x_new, source_energy, target_energy, True, batch_size)
            if metropolis:
                g_new = (1 - t) * g0_new + t * g1_new
                e_t, e_t_new = (1 - t) * e0 + t * e1, (1 - t) * e0_new + t * e1_new
                fwd = flat(x_new - x + step_size * g).square().sum(1) / (4 * step_size)
                bwd = flat(x - x_new + step_size * g_new).square().sum(1) / (4 * step_size)
                log_alpha = -(e_t_new - e_t) - bwd + fwd
                u = torch.rand(n, generator=generator, dtype=torch.float64, device=x.device)
                accept = torch.isfinite(e_t_new) & (torch.log(u) < log_alpha)
                accepted += int(accept.sum())
                proposed += n
                x = torch.where(accept.view(shape), x_new, x)
                g0, g1 = torch.where(accept.view(shape), g0_new, g0), torch.where(accept.view(shape), g1_new, g1)
                e0, e1 = torch.where(accept, e0_new, e0), torch.where(accept, e1_new, e1)
            else:
                x, e0, e1, g0, g1 = x_new, e0_new, e1_new, g0_new, g1_new
            log_w, k_bad = reject(e1, log_w)
            n_rejected += k_bad
    log_z += float(torch.logsumexp(log_w, 0)) - math.log(n)
    evaluations = n * (n_steps * langevin_steps + 1)
    return SMCResult(x=x.detach(), log_w=log_w, log_z=log_z, ess=_ess(log_w), ess_history=ess_history,
                     resampled_at=resampled_at, acceptance=accepted / proposed if proposed else None,
                     n_rejected=n_rejected, rejection_rate=n_rejected / evaluations,
                     n_ancestors=int(ancestor[torch.isfinite(log_w)].unique().numel()))
