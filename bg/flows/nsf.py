"""Neural spline flows over internal coordinates: a transform plus a base distribution.

:func:`neural_spline_flow` builds either the split-channel NSF of Kim et al. (2024) (backbone
channel first, side chains conditioned on it, GAU conditioners) or the baseline NSF (one channel,
MLP conditioners). Both are :class:`InternalFlow`\\ s with the zuko-like API ``log_prob(z)`` and
``sample(n) -> (z, log_q)`` (reparameterised: gradients flow from z and log_q to the parameters).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bg.flows.conditioners import GAUConditioner, MLPConditioner
from bg.flows.coupling import SplitChannelFlow
from bg.flows.distributions import CoordinateBase

CONDITIONERS = ("gau", "mlp")


class InternalFlow(nn.Module):
    """q(z) = p_base(f(z)) |det ∂f/∂z| for a bijection ``transform`` (z → base space).

    ``transform`` returns ``(u, log|det ∂u/∂z|)`` and has ``inverse(u) -> (z, log|det ∂z/∂u|)``.
    """

    def __init__(self, transform: nn.Module, base: CoordinateBase):
        super().__init__()
        self.transform = transform
        self.base = base

    def log_prob(self, z: Tensor) -> Tensor:
        """``(B, D)`` → ``(B,)`` log density of the internal coordinates."""
        u, ld = self.transform(z)
        return self.base.log_prob(u) + ld

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` samples ``(n, D)`` and their log density ``(n,)``."""
        dtype = next(self.parameters()).dtype
        u = self.base.sample(n, dtype=dtype)
        z, ld = self.transform.inverse(u)
        return z, self.base.log_prob(u) - ld


def neural_spline_flow(
    circular: Tensor,
    low: Tensor,
    high: Tensor,
    kinds: Tensor,
    residues: Tensor,
    backbone: Tensor,
    split_channels: bool = True,
    conditioner: str = "gau",
    backbone_layers: int = 8,
    sidechain_layers: int = 4,
    bins: int = 8,
    width: int = 64,
    depth: int = 2,
    attention_dim: int = 32,
    absolute_position: str = "sinusoidal",
    rotary: bool = True,
    tokens: str = "residue",
    base_bounded: str = "truncated_normal",
    base_torsion: str = "uniform",
) -> InternalFlow:
    """Build an NSF over ``D`` internal coordinates.

    Args:
        circular: ``(D,)`` True for torsions.
        low, high: ``(D,)`` spline intervals of bonds (nm) and angles (rad).
        kinds: ``(D,)`` 0 bond, 1 angle, 2 torsion (token type for GAU conditioners).
        residues: ``(D,)`` residue index (positions for GAU conditioners).
        backbone: ``(D,)`` True for backbone coordinates.
        split_channels: two channels (backbone, then side chains conditioned on the backbone); ``False``
            puts every coordinate in one channel with ``backbone_layers`` couplings (baseline).
        conditioner: ``"gau"`` (gated attention units) or ``"mlp"``.
        backbone_layers, sidechain_layers: couplings per channel.
        bins: spline bins. width, depth, attention_dim: conditioner size (MLP: hidden width and
            residual blocks).
        absolute_position, rotary: positional embeddings of the GAU conditioner.
        tokens: GAU tokens, ``"residue"`` (default, O(R²) attention) or ``"coordinate"``.
        base_bounded, base_torsion: base distribution families (see ``CoordinateBase``).
    """
    if conditioner not in CONDITIONERS:
        raise ValueError(f"conditioner must be one of {CONDITIONERS}, got {conditioner!r}")
    d = len(circular)

    def make(n_params: int) -> nn.Module:
        if conditioner == "mlp":
            return MLPConditioner(d, n_params, hidden=width, depth=depth)
        return GAUConditioner(kinds, residues, n_params, width=width, depth=depth, attention_dim=attention_dim,
                              absolute=absolute_position, rotary=rotary, tokens=tokens)

    channels = backbone.bool() if split_channels else torch.ones(d, dtype=torch.bool)
    transform = SplitChannelFlow(channels, circular, low, high, make, backbone_layers=backbone_layers,
                                 sidechain_layers=sidechain_layers if split_channels else 0, bins=bins)
    base = CoordinateBase(circular, low, high, bounded=base_bounded, torsion=base_torsion)
    return InternalFlow(transform, base)
