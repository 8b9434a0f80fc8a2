"""Continuous normalizing flow on mean-free coordinates, trained by (equivariant) flow matching.

Prior: a Gaussian on the (3N − 3)-dimensional subspace of frames with zero mean
(``bg.flows.mean_free_priors``): the standard one, log p₀(x) = −|x|²/2 − (3N − 3)/2 · log 2π for centred
x ``(B, N, 3)``, or the harmonic one over the bond graph. A vector field v(t, x) with zero
mean over atoms (``bg.flows.EGNN``) moves prior samples (t = 0) to data (t = 1); the mean stays zero.

Density (instantaneous change of variables): along a solution x(t),
d log q_t(x(t))/dt = −div v(t, x(t)), so log q₁(x(1)) = log p₀(x(0)) − ∫₀¹ div v dt. A mean-free field
with no dependence on the mean has the same trace on R^{3N} as on the subspace, so the divergence is
taken in R^{3N}.

- ``divergence="exact"``: the trace of the Jacobian, one backward pass per coordinate, each batched
  over the samples (3N passes); what every log q used for reweighting must use.
- ``"hutchinson"``: εᵀ(∂v/∂x)ε with one Rademacher ε per sample and solve (unbiased, one backward
  pass); for cheap training diagnostics only.

Flow matching (Lipman et al. 2023; Tong et al. 2024): x_t = (1 − t)x₀ + t·x₁ + σ·ε, target x₁ − x₀, with
x₀ from the prior and x₁ data, paired independently or by equivariant OT (``bg.flows.pairing``). Training
times have density k·t^(k−1) (``time_exponent`` k; 1: uniform): k > 1 spends more of the training on late
times, where the field places the atoms to a few thousandths of a nm. Any k keeps the same minimiser, the
conditional mean of x₁ − x₀ at each (t, x).

ODE solves use torchdiffeq (adaptive ``dopri5`` with ``rtol``/``atol``, or fixed-step ``euler``,
``midpoint``, ``rk4`` with ``steps`` steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from bg.choices import check_choices
from bg.coordinates import centred
from bg.flows.base import Flow
from bg.flows.mean_free_priors import IsotropicPrior
from bg.flows.pairing import equivariant_ot_pairs

Divergence = Literal["exact", "hutchinson"]
Pairing = Literal["independent", "ot"]
PriorKind = Literal["isotropic", "harmonic"]
AdaptiveMethod = Literal["dopri5", "dopri8", "bosh3", "adaptive_heun"]
FixedMethod = Literal["euler", "midpoint", "rk4"]
ODEMethod = Literal[AdaptiveMethod, FixedMethod]


@dataclass
class ODESolver:
    """ODE integration settings: ``method`` (adaptive: dopri5, dopri8, bosh3, adaptive_heun; fixed-step:
    euler, midpoint, rk4), ``rtol``/``atol`` (adaptive), ``steps`` (fixed-step: steps over [0, 1])."""

    method: ODEMethod = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    steps: int = 50

    def __post_init__(self) -> None:
        check_choices(ODESolver, dict(method=self.method), "ODE ")
        if self.steps < 1 or self.rtol <= 0 or self.atol <= 0:
            raise ValueError(f"ODE solver: steps ≥ 1 and positive rtol/atol needed, got {self}")

    def kwargs(self, span: float) -> dict:
        if self.method in get_args(FixedMethod):
            return dict(method=self.method, options=dict(step_size=abs(span) / self.steps))
        return dict(method=self.method, rtol=self.rtol, atol=self.atol)


def exact_divergence(v: Tensor, x: Tensor, create_graph: bool = False) -> Tensor:
    """Trace of ∂v/∂x ``(B,)`` for v ``(B, ...)`` computed from x ``(B, ...)`` with autograd: one backward
    pass per coordinate, batched over B (the samples must not interact)."""
    vf = v.reshape(len(v), -1)
    div = torch.zeros(len(v), dtype=v.dtype, device=v.device)
    for k in range(vf.shape[1]):
        g = torch.autograd.grad(vf[:, k].sum(), x, retain_graph=True, create_graph=create_graph)[0]
        div = div + g.reshape(len(v), -1)[:, k]
    return div


def hutchinson_divergence(v: Tensor, x: Tensor, eps: Tensor, create_graph: bool = False) -> Tensor:
    """Unbiased estimate εᵀ(∂v/∂x)ε ``(B,)`` with probe vectors ε shaped like x."""
    g = torch.autograd.grad(v, x, grad_outputs=eps, create_graph=create_graph)[0]
    return (g * eps).reshape(len(x), -1).sum(-1)


class _Dynamics(nn.Module):
    """(x, ℓ) ↦ (v(t, x), −div v(t, x)): the augmented ODE whose ℓ accumulates the log-density change."""

    def __init__(self, field: nn.Module, divergence: str | None, eps: Tensor | None):
        super().__init__()
        self.field, self.divergence, self.eps = field, divergence, eps
        self.nfe = 0

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x = state[0]
        self.nfe += 1
        if self.divergence is None:
            return self.field(t, x), torch.zeros_like(state[1])
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = self.field(t, x)
            if self.divergence == "exact":
                div = exact_divergence(v, x)
            else:
                div = hutchinson_divergence(v, x, self.eps)
        return v.detach(), -div.detach()


class ContinuousFlow(Flow):
    """CNF x₁ = x₀ + ∫₀¹ v(t, x) dt on mean-free frames ``(B, N, 3)`` (see module docstring).

    Args:
        field: the vector field module ``(t, x) → v``, mean-free and atom-wise independent across the batch.
        n_atoms: N.
        solver: ``ODESolver`` for sampling and densities.
        prior: the base density at t = 0 (``bg.flows.mean_free_priors``; default ``IsotropicPrior``);
            ``fit`` fits it to the training frames.

    Samples and densities come from ODE solves without gradients (``reparameterized = False``).
    """

    reparameterized = False

    def __init__(self, field: nn.Module, n_atoms: int, solver: ODESolver | None = None, prior: nn.Module | None = None):
        super().__init__()
        self.field, self.n_atoms = field, n_atoms
        self.solver = solver or ODESolver()
        self.prior = prior if prior is not None else IsotropicPrior(n_atoms)
        self.last_nfe = 0

    @property
    def dim(self) -> int:
        """Dimension of the mean-free subspace, 3(N − 1)."""
        return 3 * (self.n_atoms - 1)

    # ------------------------------------------------------------------ prior
    def fit(self, y: Tensor) -> "ContinuousFlow":
        """Fit the prior to training frames ``(F, N, 3)`` in flow units (the harmonic prior's α)."""
        self.prior.fit(centred(y))
        return self

    def prior_sample(self, n: int, dtype: torch.dtype = torch.float32, device=None,
                     generator: torch.Generator | None = None) -> Tensor:
        """``n`` centred frames ``(n, N, 3)`` from the prior."""
        return self.prior.sample(n, dtype, device, generator)

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """log p₀ ``(B,)`` of centred frames on the mean-free subspace."""
        return self.prior.log_prob(x)

    # ------------------------------------------------------------------ ODE
    def integrate(self, x: Tensor, t0: float, t1: float, divergence: Divergence | None = "exact",
                  solver: ODESolver | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Solve from t0 to t1: returns x(t1) ``(B, N, 3)`` and ∫_{t0}^{t1} div v dt ``(B,)`` (zeros when
        ``divergence`` is None). No gradients flow through the solve."""
        check_choices(ContinuousFlow.integrate, dict(divergence=divergence))
        solver = solver or self.solver
        eps = None
        if divergence == "hutchinson":
            eps = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        dyn = _Dynamics(self.field, divergence, eps)
        ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
        # inference_mode(False): the divergence needs autograd even inside Lightning's predict/validation
        with torch.inference_mode(False), torch.no_grad():
            state = (x.detach().clone(), torch.zeros(len(x), dtype=x.dtype, device=x.device))
            xs, ls = odeint(dyn, state, ts.clone(), **solver.kwargs(t1 - t0))
        self.last_nfe = dyn.nfe
        # the state integrates −div; ∫ div = −ℓ
        return xs[-1], -ls[-1]

    def sample(self, n: int, context: Any = None, divergence: Divergence | None = "exact",
               solver: ODESolver | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples ``(n, N, 3)`` and their log density ``(n,)`` on the mean-free subspace (the flow's dtype)."""
        x0 = self.prior_sample(n, self.dtype, self.device, generator)
        x1, div = self.integrate(x0, 0.0, 1.0, divergence, solver, generator)
        return x1, self.prior_log_prob(x0) - div

    def log_prob(self, x: Tensor, context: Any = None, divergence: Divergence = "exact",
                 solver: ODESolver | None = None) -> Tensor:
        """log q ``(B,)`` of frames ``(B, N, 3)`` (cast to the flow's dtype, centred), by solving back to t = 0."""
        x0, div = self.integrate(centred(x.to(self.dtype)), 1.0, 0.0, divergence, solver)
        # ∫₁⁰ div = −∫₀¹ div
        return self.prior_log_prob(x0) + div

    # ------------------------------------------------------------------ training
    def flow_matching_loss(self, x1: Tensor, sigma: float = 0.0, pairing: Pairing = "independent",
                           groups: list[Tensor] | None = None, ot_chunk: int | None = None,
                           time_exponent: float = 1.0) -> Tensor:
        """Mean squared error (per coordinate of the subspace) between v(t, x_t) and x₁ − x₀ over a batch of
        data frames ``(B, N, 3)``; ``groups`` (identical atoms) and ``ot_chunk`` as in ``equivariant_ot_pairs``;
        times t = u^(1/k) with u uniform, k = ``time_exponent`` (density k·t^(k−1))."""
        check_choices(ContinuousFlow.flow_matching_loss, dict(pairing=pairing))
        if time_exponent <= 0:
            raise ValueError(f"time_exponent must be positive, got {time_exponent}")
        x1 = centred(x1.to(self.dtype))
        x0 = self.prior_sample(len(x1), x1.dtype, x1.device)
        if pairing == "ot":
            x0, x1 = equivariant_ot_pairs(x0, x1, groups or [], ot_chunk)
        t = torch.rand(len(x1), 1, 1, dtype=x1.dtype, device=x1.device) ** (1.0 / time_exponent)
        xt = (1 - t) * x0 + t * x1
        if sigma > 0:
            xt = xt + sigma * centred(torch.randn_like(x1))
        v = self.field(t.flatten(), xt)
        return (v - (x1 - x0)).square().sum((-1, -2)).mean() / self.dim
