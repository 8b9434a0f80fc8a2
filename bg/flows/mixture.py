"""A finite mixture of Cartesian densities: q(x) = Σₖ aₖ qₖ(x).

Importance weights w = p/q are only as good as their upper tail: where a flow puts too little mass, a rare
sample carries a huge weight and the effective sample size collapses. Mixing the flow with a broad density q₀
of known shape ("defensive importance sampling", Hesterberg 1995) bounds every weight by p/(a₀ q₀): no sample
can weigh more than it would under q₀ alone, divided by its share a₀. The price is the share a₀ of samples drawn
from q₀, which weigh what q₀ deserves. Components are any densities with ``sample(n, batch_size=...) -> (x,
log_q)`` and ``log_prob(x)`` over the same frames (``bg.flows.CartesianDensity``), e.g. a trained flow and its
untrained start (``TransferableNSF(defensive=...)``), or flows of several checkpoints.

Samples are i.i.d. draws of the mixture: the component of each is drawn with probability aₖ, and its log q is
the mixture's, log Σₖ aₖ qₖ(x), so that −u − log q is an ordinary importance weight.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn


class MixtureDensity(nn.Module):
    """q(x) = Σₖ aₖ qₖ(x) over frames ``(B, N, 3)`` nm (see module docstring).

    Args:
        components: densities over the same frames: ``sample(n, batch_size=...) -> (x, log_q)``, ``log_prob(x)``.
        weights: shares aₖ ``(K,)``, positive; normalised to sum to one.
    """

    def __init__(self, components: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        if len(components) == 0 or len(components) != len(weights):
            raise ValueError(f"a mixture needs one weight per component, got {len(components)} components and "
                             f"{len(weights)} weights")
        a = torch.as_tensor([float(w) for w in weights], dtype=torch.float64)
        if not bool((a > 0).all()) or not bool(torch.isfinite(a).all()):
            raise ValueError(f"mixture weights must be positive and finite, got {list(weights)}")
        self.components = nn.ModuleList(components)
        self.register_buffer("log_weights", (a / a.sum()).log())

    reparameterized = False  # which component a sample comes from is a discrete draw
    has_latent = False
    has_to_latent = False

    @property
    def weights(self) -> Tensor:
        """aₖ ``(K,)``, summing to one."""
        return self.log_weights.exp()

    def component_log_probs(self, x: Tensor) -> Tensor:
        """log qₖ(x) ``(B, K)`` of frames ``(B, N, 3)`` nm."""
        return torch.stack([c.log_prob(x).double() for c in self.components], -1)

    def log_prob(self, x: Tensor, context: Any = None) -> Tensor:
        """log Σₖ aₖ qₖ(x) ``(B,)`` of frames ``(B, N, 3)`` nm; differentiable where every component is."""
        if context is not None:
            raise ValueError("MixtureDensity takes no context")
        return torch.logsumexp(self.component_log_probs(x) + self.log_weights, -1)

    @torch.no_grad()
    def sample(self, n: int, context: Any = None, batch_size: int | None = None,
               return_component: bool = False) -> tuple[Tensor, ...]:
        """``n`` i.i.d. samples x ``(n, N, 3)`` nm (float64) and their mixture log q ``(n,)`` (with
        ``return_component`` also the component each came from, ``(n,)`` long), in random order."""
        if context is not None:
            raise ValueError("MixtureDensity takes no context")
        if n <= 0:
            raise ValueError(f"MixtureDensity.sample needs n > 0, got {n}")
        bs = batch_size or n
        counts = torch.bincount(torch.multinomial(self.weights.float(), n, replacement=True),
                                minlength=len(self.components))
        xs, log_qs, which = [], [], []
        for k, (component, count) in enumerate(zip(self.components, counts.tolist())):
            if count == 0:
                continue
            x, own = component.sample(count, batch_size=bs)
            parts = []
            for chunk, own_chunk in zip(x.split(bs), own.split(bs)):
                # the sampling component's log q as it came out of the draw; the others evaluated at the frames
                logs = torch.stack([own_chunk.double() if j == k else c.log_prob(chunk).double()
                                    for j, c in enumerate(self.components)], -1)
                parts.append(torch.logsumexp(logs + self.log_weights, -1))
            xs.append(x.double())
            log_qs.append(torch.cat(parts))
            which.append(torch.full((count,), k, dtype=torch.long))
        order = torch.randperm(n)
        x, log_q, component = torch.cat(xs)[order], torch.cat(log_qs)[order], torch.cat(which)[order]
        return (x, log_q, component) if return_component else (x, log_q)


__all__ = ["MixtureDensity"]
