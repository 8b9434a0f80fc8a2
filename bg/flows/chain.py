"""Composition of invertible layers that return (output, log|det|)."""

from __future__ import annotations

from torch import Tensor, nn


def run_chain(layers: nn.ModuleList, x: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
    """Apply ``layers`` in order (or their inverses in reverse order): output and summed log-det ``(B,)``."""
    total = x.new_zeros(x.shape[0])
    for layer in (reversed(layers) if inverse else layers):
        x, log_det = layer.inverse(x) if inverse else layer(x)
        total = total + log_det
    return x, total
