"""The interface every flow shares, and the Cartesian density that composes a flow with a representation.

A :class:`Flow` is a density in its own space (internal coordinates, centred scaled frames, ...):
``log_prob(y) -> (B,)`` and ``sample(n) -> (y, log_q)``, plus ``fit(y)`` for data-dependent buffers
(spline bounds, base statistics). Flows take ``context=None`` in both calls: a conditional flow (one
model for many molecules) reads the molecule from it and sets ``conditional = True``; an unconditional
flow refuses a context. ``reparameterized`` declares whether gradients flow from ``sample`` to the
parameters (needed by the reverse-KL and W2 loss terms) and from ``log_prob`` to its input (needed by SMC).

:class:`CartesianDensity` = flow ∘ representation, written once for every family: positions ``x``
``(B, N, 3)`` nm ↔ ``y = representation(x)``, log q(x) = log q_flow(y) + log|det ∂y/∂x|. Everything
downstream (loss terms, samplers, evaluation) talks to it in Cartesian nm and float64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class Flow(nn.Module):
    """Base of the flows (see module docstring). Subclasses implement ``log_prob`` and ``sample``."""

    #: gradients flow from ``sample`` to the parameters and from ``log_prob`` to its input
    reparameterized: bool = True
    #: accepts a molecule as ``context`` (transferable families)
    conditional: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the flow computes in: that of its parameters (float64 for a flow without weights)."""
        parameter = next(self.parameters(), None)
        return torch.float64 if parameter is None else parameter.dtype

    @property
    def device(self) -> torch.device:
        tensor = next(self.parameters(), None)
        if tensor is None:
            tensor = next(self.buffers(), None)
        return torch.device("cpu") if tensor is None else tensor.device

    def fit(self, y: Tensor) -> "Flow":
        """Set data-dependent buffers from training data ``y`` in the flow's space (default: none)."""
        return self

    def log_prob(self, y: Tensor, context: Any = None) -> Tensor:
        """log q ``(B,)`` of points ``y`` ``(B, ...)`` of the flow's space."""
        raise NotImplementedError

    def sample(self, n: int, context: Any = None) -> tuple[Tensor, Tensor]:
        """``n`` points ``(n, ...)`` and their log q ``(n,)``."""
        raise NotImplementedError

    # A flow that pushes a fixed base density through a differentiable map exposes the map, so that samplers can
    # move in its latent space (the flow as a preconditioner): log q(y) = latent_log_prob(z) − log|det ∂y/∂z|.
    @property
    def has_latent(self) -> bool:
        """Whether ``sample_latent``, ``latent_log_prob`` and ``from_latent`` are implemented."""
        return type(self).from_latent is not Flow.from_latent

    def sample_latent(self, n: int) -> Tensor:
        """``n`` draws ``(n, ...)`` of the base density."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its latent space")

    def latent_log_prob(self, z: Tensor) -> Tensor:
        """log density ``(B,)`` of the base at latent points ``z``."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its latent space")

    def from_latent(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent ``z`` → points ``y`` of the flow's space and log|det ∂y/∂z| ``(B,)``, differentiable in ``z``."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its latent space")

    @property
    def has_to_latent(self) -> bool:
        """Whether ``to_latent`` (points → latent, the inverse of ``from_latent``) is implemented."""
        return type(self).to_latent is not Flow.to_latent

    def to_latent(self, y: Tensor) -> Tensor:
        """Points ``y`` of the flow's space → their latent ``z`` (``from_latent(to_latent(y))[0] == y``)."""
        raise NotImplementedError(f"{type(self).__name__} does not map its points to its latent space")


class CartesianDensity(nn.Module):
    """A flow over a representation, as a density of Cartesian positions (see module docstring).

    Args:
        representation: ``forward(x) -> (y, log|det ∂y/∂x|)``, ``inverse(y) -> (x, log|det ∂x/∂y|)`` and
            ``fit(frames)`` (``bg.coordinates.InternalCoordinates`` or ``CartesianCoordinates``).
        flow: a :class:`Flow` over the representation's space.
    """

    def __init__(self, representation: nn.Module, flow: Flow):
        super().__init__()
        self.representation, self.flow = representation, flow

    @property
    def reparameterized(self) -> bool:
        return self.flow.reparameterized

    def _context(self, context: Any) -> dict[str, Any]:
        if context is None:
            return {}
        if not self.flow.conditional:
            raise ValueError(f"{type(self.flow).__name__} is not conditioned on the molecule; pass no context")
        return dict(context=context)

    @torch.no_grad()
    def fit(self, frames: Tensor, batch_size: int = 4096) -> "CartesianDensity":
        """Fit the representation, then the flow, to training frames ``(F, N, 3)`` nm."""
        frames = frames.double()
        self.representation.fit(frames)
        y = torch.cat([self.representation(c)[0] for c in frames.split(batch_size)])
        self.flow.fit(y)
        return self

    def rsample(self, n: int, context: Any = None) -> tuple[Tensor, Tensor]:
        """``n`` reparameterised samples: x ``(n, N, 3)`` nm (float64) and log q ``(n,)``, differentiable."""
        if not self.reparameterized:
            raise RuntimeError(f"{type(self.flow).__name__} has no reparameterised samples")
        return self._draw(n, context)

    def _draw(self, n: int, context: Any) -> tuple[Tensor, Tensor]:
        y, log_q = self.flow.sample(n, **self._context(context))
        x, log_det = self.representation.inverse(y.double())
        return x, log_q.double() - log_det

    @torch.no_grad()
    def sample(self, n: int, context: Any = None, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples without gradients, in batches of ``batch_size``: x ``(n, N, 3)`` nm (float64), log q ``(n,)``."""
        bs = batch_size or max(n, 1)
        parts = [self._draw(min(bs, n - i), context) for i in range(0, n, bs)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @property
    def has_latent(self) -> bool:
        """Whether the flow exposes its latent space (``from_latent``)."""
        return self.flow.has_latent

    def sample_latent(self, n: int) -> Tensor:
        """``n`` draws of the flow's base density (float64)."""
        return self.flow.sample_latent(n).double()

    def latent_log_prob(self, z: Tensor) -> Tensor:
        """log density ``(B,)`` of the flow's base at ``z`` (float64)."""
        return self.flow.latent_log_prob(z).double()

    @property
    def has_to_latent(self) -> bool:
        """Whether frames can be mapped to the flow's latent space (``to_latent``)."""
        return self.flow.has_to_latent

    def to_latent(self, x: Tensor) -> Tensor:
        """Frames ``(B, N, 3)`` nm → the flow's latent ``z`` (``from_latent``'s inverse up to the rigid motion the
        representation removes)."""
        return self.flow.to_latent(self.representation(x.double())[0])

    def from_latent(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent ``z`` → frames x ``(B, N, 3)`` nm (float64) and log|det ∂x/∂z| ``(B,)`` in the representation's
        convention, so that log q(x) = ``latent_log_prob(z)`` − log|det|; differentiable in ``z``."""
        y, log_det = self.flow.from_latent(z)
        x, log_det_rep = self.representation.inverse(y.double())
        return x, log_det.double() + log_det_rep

    def log_prob(self, x: Tensor, context: Any = None, **options: Any) -> Tensor:
        """Cartesian log density ``(B,)`` of frames ``(B, N, 3)`` nm; ``options`` go to the flow's ``log_prob``."""
        y, log_det = self.representation(x.double())
        return self.flow.log_prob(y, **self._context(context), **options).double() + log_det
