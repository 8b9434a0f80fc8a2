"""TarFlow: a Transformer autoregressive flow on token sequences (Zhai et al. 2024; used on all-atom
Cartesian coordinates by Sequential Boltzmann Generators, Tan et al. 2025).

A sequence x ``(B, T, D)`` (one token per atom with D = 3, or one per coordinate with D = 1) passes
through blocks. Each block runs a causal Transformer (pre-LayerNorm, learned position embeddings)
over the tokens, shifts its outputs by one token so that the affine parameters (a_i, b_i) of token i
depend only on tokens before it, and maps z_i = (x_i − b_i)·exp(−a_i), log|det ∂z/∂x| = −Σ a_i. The
output projection starts at zero, so an untrained flow is the identity. Blocks alternate the token
order (identity, reversed, …). The prior is a standard normal. Data → latent is one parallel pass per
block; latent → data is sequential over tokens (T passes per block, each on the prefix).

``a`` is soft-clamped to (−``max_log_scale``, ``max_log_scale``) by a scaled tanh, which keeps the
inverse well conditioned without changing the form of the transform.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bg.flows.chain import run_chain


class _CausalLayer(nn.Module):
    def __init__(self, channels: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(channels, mlp_ratio * channels), nn.GELU(),
                                 nn.Linear(mlp_ratio * channels, channels))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        q = self.norm1(h)
        h = h + self.attn(q, q, q, attn_mask=mask, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class TarFlowBlock(nn.Module):
    """One autoregressive affine block over ``(B, T, D)`` tokens (see module docstring)."""

    def __init__(self, n_tokens: int, token_dim: int, channels: int = 64, layers: int = 2, heads: int = 4,
                 mlp_ratio: int = 4, reverse: bool = False, max_log_scale: float = 4.0):
        super().__init__()
        self.n_tokens, self.token_dim, self.reverse, self.max_log_scale = n_tokens, token_dim, reverse, max_log_scale
        self.embed = nn.Linear(token_dim, channels)
        self.position = nn.Parameter(torch.randn(n_tokens, channels) * 0.02)
        self.layers = nn.ModuleList(_CausalLayer(channels, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(channels)
        self.out = nn.Linear(channels, 2 * token_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) ``(B, t + 1, D)`` for tokens 0..t from the prefix x ``(B, t, D)`` (token 0 gets zeros)."""
        b_, t, d = x.shape
        h = self.embed(x) + self.position[:t]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        for layer in self.layers:
            h = layer(h, mask)
        out = self.out(self.norm(h))
        out = torch.cat([out.new_zeros(b_, 1, 2 * d), out], 1)  # the shift: token i sees tokens < i
        a, b = out.chunk(2, -1)
        a = self.max_log_scale * torch.tanh(a / self.max_log_scale)
        return a, b

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data → latent: z ``(B, T, D)`` and log|det ∂z/∂x| ``(B,)``."""
        if self.reverse:
            x = x.flip(1)
        a, b = self._params(x[:, :-1])
        z = (x - b) * torch.exp(-a)
        if self.reverse:
            z = z.flip(1)
        return z, -a.flatten(1).sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent → data, one token at a time: x ``(B, T, D)`` and log|det ∂x/∂z| ``(B,)``."""
        if self.reverse:
            z = z.flip(1)
        xs: list[Tensor] = []
        log_det = z.new_zeros(z.shape[0])
        for i in range(z.shape[1]):
            prefix = torch.stack(xs, 1) if xs else z[:, :0]
            a, b = self._params(prefix)
            a_i, b_i = a[:, i], b[:, i]
            xs.append(z[:, i] * torch.exp(a_i) + b_i)
            log_det = log_det + a_i.sum(-1)
        x = torch.stack(xs, 1)
        if self.reverse:
            x = x.flip(1)
        return x, log_det


class TarFlow(nn.Module):
    """Stack of ``TarFlowBlock``s with alternating token order and a standard normal prior.

    Args:
        n_tokens, token_dim: T and D of the ``(B, T, D)`` sequences.
        channels, layers, heads, mlp_ratio: Transformer width, layers per block, attention heads,
            MLP expansion.
        blocks: number of autoregressive blocks (odd blocks read the tokens in reverse).
        max_log_scale: bound of |a| (soft clamp).
    """

    def __init__(self, n_tokens: int, token_dim: int = 3, channels: int = 64, blocks: int = 4, layers: int = 2,
                 heads: int = 4, mlp_ratio: int = 4, max_log_scale: float = 4.0):
        super().__init__()
        if channels % heads:
            raise ValueError(f"TarFlow: channels ({channels}) must be divisible by heads ({heads})")
        self.n_tokens, self.token_dim = n_tokens, token_dim
        self.blocks = nn.ModuleList(
            TarFlowBlock(n_tokens, token_dim, channels, layers, heads, mlp_ratio, reverse=k % 2 == 1,
                         max_log_scale=max_log_scale) for k in range(blocks))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data → latent: z ``(B, T, D)`` and log|det ∂z/∂x| ``(B,)``."""
        return run_chain(self.blocks, x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent → data: x ``(B, T, D)`` and log|det ∂x/∂z| ``(B,)``."""
        return run_chain(self.blocks, z, inverse=True)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * z.square().flatten(1).sum(1) - 0.5 * z[0].numel() * math.log(2 * math.pi)

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) ``(B,)`` of sequences ``(B, T, D)``."""
        z, log_det = self(x)
        return self.prior_log_prob(z) + log_det

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples ``(n, T, D)`` and their log q ``(n,)`` (reparameterised: differentiable)."""
        p = next(self.parameters())
        z = torch.randn(n, self.n_tokens, self.token_dim, generator=generator, dtype=p.dtype, device=p.device)
        x, log_det = self.inverse(z)
        return x, self.prior_log_prob(z) - log_det
