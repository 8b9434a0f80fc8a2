"""Spline coupling layers and the split-channel flow over internal coordinates."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from bg.choices import check_choices
from bg.flows.chain import run_chain
from bg.flows.conditioners import coordinate_features
from bg.flows.splines import compiled_rq_spline, rq_spline

CouplingMasks = Literal["interleaved", "shuffled"]


class SplineCoupling(nn.Module):
    """Transforms the coordinates in ``transform`` with RQ splines whose parameters a conditioner
    computes from the coordinates in ``condition`` (the rest pass through untouched and unseen).

    Args:
        transform, condition: ``(D,)`` disjoint boolean masks.
        circular: ``(D,)`` True for torsions (circular splines on [−π, π)).
        low, high: ``(D,)`` interval of the bounded coordinates.
        conditioner: module mapping features ``(B, D, 3)`` and the coordinates it transforms ``(M,)`` → their
            parameters ``(B, M, 3K + 1)`` (``conditioner(features, rows)``, as the conditioners here take).
        bins: K.
        compile_spline: in training mode, run the splines through :func:`compiled_rq_spline` (same results,
            fused: faster on CPU, where a coupling's elementwise work is a third of its time). Eval mode
            (sampling, evaluation) stays eager, so a checkpoint samples anywhere without a compiler.
    """

    def __init__(self, transform: Tensor, condition: Tensor, circular: Tensor, low: Tensor, high: Tensor,
                 conditioner: nn.Module, bins: int = 8, compile_spline: bool = False):
        super().__init__()
        if (transform & condition).any():
            raise ValueError("a coupling cannot condition on coordinates it transforms")
        self.register_buffer("transform", transform.bool())
        self.register_buffer("condition", condition.bool())
        self.register_buffer("circular", circular.bool())
        self.register_buffer("low", low.float())
        self.register_buffer("high", high.float())
        self.conditioner = conditioner
        self.bins, self.compile_spline = bins, compile_spline
        # Integer indices instead of boolean masks (index_select and cat instead of masked indexing and
        # index_put: no nonzero() per call). Derived from ``transform`` (fixed at construction), so not saved.
        kept, moved = torch.nonzero(~self.transform).flatten(), torch.nonzero(self.transform).flatten()
        self.register_buffer("_moved", moved, persistent=False)
        self.register_buffer("_kept", kept, persistent=False)
        self.register_buffer("_merge", torch.argsort(torch.cat([kept, moved])), persistent=False)

    def _params(self, z: Tensor) -> Tensor:
        hidden = ~self.condition  # what the conditioner must not see
        feats = coordinate_features(z, hidden, self.circular, self.low.to(z.dtype), self.high.to(z.dtype))
        return self.conditioner(feats, self._moved)

    def _transform(self, z: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        p = self._params(z)
        k = self.bins
        w, h, d = p[..., :k], p[..., k : 2 * k], p[..., 2 * k :]
        zt = z.index_select(1, self._moved)
        circ = self.circular.index_select(0, self._moved)
        low = torch.where(circ, -math.pi, self.low.index_select(0, self._moved)).to(z.dtype)
        high = torch.where(circ, math.pi, self.high.index_select(0, self._moved)).to(z.dtype)
        # One spline on [0, 1] for bounded and circular coordinates alike, each mapped affinely (a torsion's
        # [−π, π) as any interval: the same map as a circular spline on [−π, π), whose end derivatives are
        # tied: the last knot reuses the first one's).
        d = torch.where(circ[:, None], torch.cat([d[..., :k], d[..., :1]], -1), d)
        spline = compiled_rq_spline() if self.compile_spline and self.training else rq_spline
        y, ld = spline((zt - low) / (high - low), w, h, d, low=0.0, high=1.0, inverse=inverse)
        y = low + y * (high - low)
        y = torch.where(circ & (y >= math.pi), y - 2 * math.pi, y)  # torsions keep the [−π, π) convention
        z = torch.cat([z.index_select(1, self._kept), y], 1).index_select(1, self._merge)
        return z, ld.sum(-1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(z, inverse=False)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(z, inverse=True)


class SplitChannelFlow(nn.Module):
    """The split-channel flow: backbone couplings first, then side-chain couplings conditioned on
    the whole backbone (Kim et al. 2024).

    ``forward`` maps coordinates z ``(B, D)`` to the base space and returns log|det|; ``inverse``
    maps base samples back. Within each channel, couplings alternate between two halves of the
    channel's coordinates (interleaved by index, so each half spans the whole chain).

    Args:
        backbone: ``(D,)`` True for backbone coordinates.
        circular, low, high: as in :class:`SplineCoupling`.
        make_conditioner: ``(n_params, slot) -> nn.Module`` building the conditioner of a coupling; ``slot`` is
            the coupling's place in the nominal stack (backbone couplings 0 … backbone_layers − 1, then the
            side-chain ones), the same for every molecule even where a channel is empty or too small to split
            (a transferable flow shares one conditioner per slot across molecules).
        backbone_layers, sidechain_layers: couplings per channel (even numbers transform each half).
        bins: spline bins.
        masks: ``"interleaved"``: every pair of couplings splits the channel the same way (alternate
            coordinates by index); ``"shuffled"``: each pair splits it by a fresh permutation (fixed: drawn
            from a generator seeded by the pair's index), so every two coordinates condition each other
            directly in some coupling. With interleaved halves the angle and torsion of one atom (indices
            differing by the odd number of angles) always sit in the same half.
        compile_splines: see ``compile_spline`` of :class:`SplineCoupling`.
    """

    def __init__(self, backbone: Tensor, circular: Tensor, low: Tensor, high: Tensor,
                 make_conditioner: Callable[[int, int], nn.Module], backbone_layers: int = 4, sidechain_layers: int = 4,
                 bins: int = 8, masks: CouplingMasks = "interleaved", compile_splines: bool = False):
        super().__init__()
        check_choices(SplitChannelFlow.__init__, dict(masks=masks))
        backbone = backbone.bool()
        layers = []
        for first, channel, n_layers, visible in ((0, backbone, backbone_layers, backbone),
                                                  (backbone_layers, ~backbone, sidechain_layers,
                                                   torch.ones_like(backbone))):
            idx = torch.nonzero(channel).flatten()
            if len(idx) == 0:
                continue
            for i in range(n_layers):
                if i % 2 == 0:
                    order = idx
                    if masks == "shuffled" and i > 0:
                        order = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(i // 2))]
                    halves = [torch.zeros_like(channel), torch.zeros_like(channel)]
                    halves[0][order[0::2]], halves[1][order[1::2]] = True, True
                t = halves[i % 2]
                if not t.any():
                    continue
                cond = visible & ~t
                layers.append(SplineCoupling(t, cond, circular, low, high, make_conditioner(3 * bins + 1, first + i), bins,
                                             compile_splines))
        self.layers = nn.ModuleList(layers)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return run_chain(self.layers, z)

    def inverse(self, u: Tensor) -> tuple[Tensor, Tensor]:
        return run_chain(self.layers, u, inverse=True)
