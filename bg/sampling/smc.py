"""Sequential Monte Carlo with annealed Langevin moves from a proposal to a target (Jarzynski weights).

The particles start as samples of the source q (E0 = −log q) and are moved along the linear path
E_t = (1 − t)·E0 + t·E1 for t_1 … t_K = 1/K … 1. At each t_k the log-weights gain the Jarzynski
increment −(t_k − t_{k−1})·(E1(x) − E0(x)) at the current particles, the particles are resampled
(systematic) when the ESS falls below ``ess_threshold``, and an MCMC kernel (``bg.sampling.kernels``:
unadjusted or Metropolis-adjusted Langevin) moves them, leaving exp(−E_{t_k}) invariant. The loop ends at t_K = 1, the target; the
public SBG code iterated ``timesteps[:-1]`` and stopped one step short at (K − 1)/K.

With ``schedule="adaptive"`` the path points are not fixed: each next t is the largest one (found by
bisection) whose incremental weights keep the conditional ESS (Zhou, Johansen & Aston 2016)

    CESS(t') = n · (Σ_i W_i w_i)² / Σ_i W_i w_i²,   w_i = exp(−(t' − t)·(E1 − E0)(x_i)),  W: current weights

at ``target_cess`` · n, so that the path takes small steps where q and the target disagree and large ones
where they agree; ``n_steps`` then bounds the number of points (each step covers at least the remaining
distance over the remaining points). The choice depends on the current particles only, so the weights
stay valid (the adaptive-SMC argument of Jasra et al. 2011).

Estimates: E_p[f] ≈ Σ w_i f(x_i) / Σ w_i with the final weights; log Z1/Z0 accumulates
log mean(w) over the resampling epochs (unbiased for Z1/Z0 itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bg.choices import check_choices
from bg.sampling.ess import kish_ess
from bg.sampling.kernels import MALA, ULA, Particles

Energy = Callable[[Tensor], Tensor]
Schedule = Literal["linear", "adaptive"]


@dataclass
class SMCResult:
    """Attributes:
        x: final particles ``(n, *event)``.
        log_w: their log-weights ``(n,)`` (float64, relative; −inf: rejected by the energy cut).
        log_z: estimate of log Z1/Z0.
        ess: Kish ESS / n of the final weights.
        ess_history: ESS / n before each resampling decision (K values).
        path: the path points t_1 … t_K = 1 (evenly spaced, or chosen by the adaptive schedule).
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
    path: list[float] = field(default_factory=list)
    resampled_at: list[float] = field(default_factory=list)
    acceptance: float | None = None
    n_rejected: int = 0
    rejection_rate: float = 0.0
    n_ancestors: int = 0

    @property
    def weights(self) -> Tensor:
        """Self-normalised weights ``(n,)``."""
        return torch.softmax(self.log_w, 0)


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


def evaluator(source: Energy, target: Energy, batch_size: int | None = None):
    """``x -> (E0, E1, ∇E0, ∇E1)`` for kernels (``bg.sampling.kernels``), in chunks of ``batch_size`` particles;
    called with ``grad=False`` it skips the backward pass (gradients ``None``)."""
    return partial(_energies, source=source, target=target, grad=True, batch_size=batch_size)


def at_target(x: Tensor, target_energy: Energy, kernel: ULA, steps: int, batch_size: int | None = None,
              generator: torch.Generator | None = None, progress: bool = False) -> tuple[Particles, int]:
    """``steps`` moves of ``kernel`` at the end of the path (t = 1, exp(−E1) alone) from ``x`` ``(n, *event)``: the
    particles (``x``, ``e1`` = E1, ``g1``) and how many proposals were accepted (``progress``: a bar on stderr)."""
    evaluate = evaluator(lambda s: 0.0 * s.flatten(1).sum(1), target_energy, batch_size)  # E0 plays no part at t = 1
    p, accepted = Particles(x.detach(), *evaluate(x.detach())), 0
    for _ in tqdm(range(steps), desc="MCMC at the target", disable=not progress, leave=False):
        p, k = kernel.step(p, 1.0, evaluate, generator)
        accepted += k
    return p, accepted


def smc(x: Tensor, source_energy: Energy, target_energy: Energy, n_steps: int = 100, langevin_steps: int = 1,
        step_size: float = 1e-3, metropolis: bool = False, ess_threshold: float = 0.5,
        energy_cut: float | None = None, batch_size: int | None = None, generator: torch.Generator | None = None,
        progress: bool = False, kernel: ULA | None = None, schedule: Schedule = "linear",
        target_cess: float = 0.95) -> SMCResult:
    """Transport samples ``x`` ``(n, *event)`` of q toward exp(−E1) (see module docstring).

    Args:
        x: proposal samples (e.g. flow samples, Cartesian nm).
        source_energy: E0(x) = −log q(x) ``(B, *event)`` → ``(B,)``, differentiable.
        target_energy: E1(x) = u(x) in kT, differentiable.
        n_steps: K, the number of path points t_1 … t_K (= 1); with ``schedule="adaptive"`` the most of them.
        langevin_steps: kernel steps per path point.
        step_size, metropolis: the kernel when ``kernel`` is not given: ``MALA(step_size)`` with
            ``metropolis``, else ``ULA(step_size)`` (``bg.sampling.kernels``).
        ess_threshold: resample when ESS / n falls below this (1: every step; 0: never).
        energy_cut: particles whose target energy exceeds this (kT), or is not finite, get weight 0.
        batch_size: particles per energy/gradient evaluation (bounds memory); ``None``: all at once.
        generator: random stream of the noise and of resampling.
        progress: show a progress bar over the path points (stderr).
        kernel: an MCMC kernel with ``step(particles, t, evaluate, generator)`` (``bg.sampling.kernels``).
        schedule: ``"linear"`` (t_k = k/K) or ``"adaptive"`` (see module docstring).
        target_cess: the conditional ESS / n each adaptive step keeps (0 < target_cess < 1).
    """
    if n_steps < 1 or langevin_steps < 0 or step_size <= 0:
        raise ValueError("smc: n_steps ≥ 1, langevin_steps ≥ 0 and step_size > 0 are required")
    check_choices(smc, dict(schedule=schedule), "smc: ")
    if not 0 < target_cess < 1:
        raise ValueError(f"smc: target_cess must lie in (0, 1), got {target_cess}")
    kernel = kernel or (MALA(step_size) if metropolis else ULA(step_size))
    n = x.shape[0]
    evaluate = evaluator(source_energy, target_energy, batch_size)
    p = Particles(x.detach(), *_energies(x.detach(), source_energy, target_energy, langevin_steps > 0, batch_size))
    log_w = torch.zeros(n, dtype=torch.float64, device=x.device)
    cut = _EnergyCut(energy_cut)
    log_w = cut(p.e1, log_w)
    log_z, ess_history, resampled_at, accepted, proposed = 0.0, [], [], 0, 0
    ancestor = torch.arange(n, device=x.device)
    path: list[float] = []
    t_prev = 0.0
    for k in tqdm(range(1, n_steps + 1), desc="SMC", disable=not progress, leave=False):
        gap = torch.nan_to_num(p.e1 - p.e0, nan=math.inf, posinf=math.inf)
        if schedule == "linear":
            t = k / n_steps
        else:  # at least an even share of what is left, so that the path ends within n_steps points
            t = next_temperature(log_w, gap, t_prev, (1.0 - t_prev) / (n_steps - k + 1), target_cess)
        dt, t_prev = t - t_prev, t
        path.append(t)
        log_w = log_w - dt * gap
        if not torch.isfinite(log_w).any():
            raise FloatingPointError(f"smc: every particle has weight 0 at t={t:.3f} (energy cut or non-finite "
                                     "energies); raise energy_cut, lower step_size or start from better proposals")
        ess = float(kish_ess(log_w))
        ess_history.append(ess)
        if ess < ess_threshold:
            log_z += float(torch.logsumexp(log_w, 0)) - math.log(n)
            idx = systematic_resample(torch.softmax(log_w, 0), generator)
            p, ancestor = p.select(idx), ancestor[idx]
            log_w = torch.zeros_like(log_w)
            resampled_at.append(t)
        for _ in range(langevin_steps):
            p, k_accepted = kernel.step(p, t, evaluate, generator)
            accepted, proposed = accepted + k_accepted, proposed + n
            log_w = cut(p.e1, log_w)
        if t >= 1.0:
            break
    log_z += float(torch.logsumexp(log_w, 0)) - math.log(n)
    evaluations = n * (len(path) * langevin_steps + 1)
    return SMCResult(x=p.x.detach(), log_w=log_w, log_z=log_z, ess=float(kish_ess(log_w)), ess_history=ess_history,
                     path=path, resampled_at=resampled_at,
                     acceptance=accepted / proposed if proposed and kernel.adjusted else None,
                     n_rejected=cut.n_rejected, rejection_rate=cut.n_rejected / evaluations,
                     n_ancestors=int(ancestor[torch.isfinite(log_w)].unique().numel()))


#: final particles descending from fewer distinct proposals than this fraction of them: a collapsed population
COLLAPSE_FRACTION = 0.1


def collapsed(n_ancestors: int | None, n: int) -> bool:
    """Whether ``n`` final particles descend from fewer than ``COLLAPSE_FRACTION`` · n distinct proposals."""
    return n_ancestors is not None and n_ancestors < COLLAPSE_FRACTION * n


def conditional_ess(log_w: Tensor, increment: Tensor) -> Tensor:
    """CESS / n of incremental log-weights ``increment`` ``(n,)`` under current log-weights ``log_w`` ``(n,)``:
    (Σ W w)² / Σ W w² with W the normalised current weights (1 when the increment is constant)."""
    log_weights = log_w - torch.logsumexp(log_w, 0)
    return torch.exp(2 * torch.logsumexp(log_weights + increment, 0) - torch.logsumexp(log_weights + 2 * increment, 0))


def next_temperature(log_w: Tensor, gap: Tensor, t: float, min_step: float, target_cess: float,
                     iterations: int = 50) -> float:
    """The largest t' in [t + min_step, 1] whose increment −(t' − t)·gap keeps ``conditional_ess`` ≥
    ``target_cess`` (bisection; the CESS falls monotonically with t'), or t + min_step when even that step
    falls below it."""
    low, high = min(t + min_step, 1.0), 1.0
    cess = lambda s: float(conditional_ess(log_w, -(s - t) * gap))  # noqa: E731
    if cess(high) >= target_cess:
        return high
    if cess(low) < target_cess:
        return low
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if cess(mid) >= target_cess else (low, mid)
    return low


class _EnergyCut:
    """Weight 0 for particles with a non-finite target energy or one above ``limit`` kT; counts them."""

    def __init__(self, limit: float | None):
        self.limit, self.n_rejected = limit, 0

    def __call__(self, e1: Tensor, log_w: Tensor) -> Tensor:
        bad = ~torch.isfinite(e1)
        if self.limit is not None:
            bad |= e1 > self.limit
        self.n_rejected += int(bad.sum())
        return log_w.masked_fill(bad, -math.inf)
