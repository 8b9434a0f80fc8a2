"""Conditioners: networks that map the conditioning coordinates to spline parameters.

Both take the current coordinates ``z`` ``(B, D)`` with the entries being transformed masked out
(``mask`` True where transformed), and return parameters ``(B, D, P)`` for every coordinate (the
coupling uses the rows it transforms). Circular coordinates enter as (cos, sin), bounded ones as
their value scaled to [−1, 1].

- :class:`MLPConditioner`: the baseline NSF conditioner (flattened features → residual MLP).
- :class:`GAUConditioner`: one token per coordinate (value features + kind embedding + a mask
  flag), absolute sinusoidal position of the coordinate's residue added to the tokens and rotary
  embeddings of the residue index in the attention (Kim et al. 2024), mixed by gated attention
  units (Hua et al. 2022): u = SiLU(W_u x), v = SiLU(W_v x), shared z = SiLU(W_z x) with per-dim
  scale/offset for queries and keys, attention relu(q·k/√s)²/T, output W_o(u ⊙ A v). Attention
  over coordinates lets distant residues condition each other.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def coordinate_features(z: Tensor, mask: Tensor, circular: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``(B, D, 3)`` features: (cos, sin) for circular, (scaled value, 0) for bounded, and the mask flag;
    masked (transformed) coordinates have zero value features."""
    scaled = 2 * (z - low) / (high - low) - 1
    a = torch.where(circular, torch.cos(z), scaled)
    b = torch.where(circular, torch.sin(z), torch.zeros_like(z))
    keep = (~mask).to(z.dtype)
    return torch.stack([a * keep, b * keep, mask.to(z.dtype).expand_as(z)], -1)


class MLPConditioner(nn.Module):
    """Residual MLP on the flattened features of all coordinates → parameters ``(B, D, P)``."""

    def __init__(self, dim: int, n_params: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        self.dim, self.n_params = dim, n_params
        self.inp = nn.Linear(3 * dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(),
                                                  nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Linear(hidden, dim * n_params)
        nn.init.zeros_(self.out.weight)  # start near the identity map
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Tensor) -> Tensor:
        h = self.inp(features.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).view(-1, self.dim, self.n_params)


def sinusoidal(positions: Tensor, dim: int) -> Tensor:
    """Absolute sinusoidal embeddings ``(..., dim)`` of integer positions."""
    half = dim // 2
    freq = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / max(1, half))
    ang = positions.float()[..., None] * freq
    return torch.cat([torch.sin(ang), torch.cos(ang)], -1)


def rotary(x: Tensor, positions: Tensor) -> Tensor:
    """Rotary position embedding of ``x`` ``(B, T, s)`` (s even) by integer ``positions`` ``(T,)``."""
    s = x.shape[-1]
    freq = torch.exp(-math.log(10_000.0) * torch.arange(0, s, 2, dtype=x.dtype, device=x.device) / s)
    ang = positions.to(x.dtype)[:, None] * freq  # (T, s/2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


class GatedAttentionUnit(nn.Module):
    """One GAU layer (pre-LayerNorm, residual) over tokens ``(B, T, d)`` with rotary positions."""

    def __init__(self, d: int, expansion: int = 2, s: int = 64):
        super().__init__()
        e = expansion * d
        self.norm = nn.LayerNorm(d)
        self.uv = nn.Linear(d, 2 * e)
        self.z = nn.Linear(d, s)
        self.gamma = nn.Parameter(torch.ones(2, s) + 0.02 * torch.randn(2, s))
        self.beta = nn.Parameter(torch.zeros(2, s))
        self.out = nn.Linear(e, d)
        self.s = s

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        h = self.norm(x)
        u, v = nn.functional.silu(self.uv(h)).chunk(2, -1)
        z = nn.functional.silu(self.z(h))
        q = rotary(z * self.gamma[0] + self.beta[0], positions)
        k = rotary(z * self.gamma[1] + self.beta[1], positions)
        attn = torch.relu(q @ k.transpose(-1, -2) / math.sqrt(self.s)) ** 2 / x.shape[1]
        return x + self.out(u * (attn @ v))


class GAUConditioner(nn.Module):
    """Gated-attention conditioner over coordinate tokens (see module docstring).

    Args:
        kinds: ``(D,)`` int kind of each coordinate (0 bond, 1 angle, 2 torsion; more allowed).
        residues: ``(D,)`` residue index of each coordinate (positions for both embeddings).
        n_params: parameters per coordinate.
        width, depth: token width and number of GAU layers.
    """

    def __init__(self, kinds: Tensor, residues: Tensor, n_params: int, width: int = 64, depth: int = 2,
                 n_kinds: int = 8, attention_dim: int = 32):
        super().__init__()
        self.register_buffer("kinds", kinds.long())
        self.register_buffer("residues", residues.long())
        self.embed = nn.Linear(3, width)
        self.kind = nn.Embedding(n_kinds, width)
        self.register_buffer("position", sinusoidal(residues, width))
        self.layers = nn.ModuleList(GatedAttentionUnit(width, s=attention_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, n_params)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Tensor) -> Tensor:
        x = self.embed(features) + self.kind(self.kinds) + self.position.to(features.dtype)
        for layer in self.layers:
            x = layer(x, self.residues)
        return self.out(self.norm(x))
