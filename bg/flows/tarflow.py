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

:class:`CartesianTarFlow` is the TarFlow over molecular frames ``(B, N, 3)``: atom or coordinate tokens,
and the centre-of-mass correction of ``bg.coordinates.com`` that turns the density of all 3N numbers
into one of the centred frame (extended-space importance sampling).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from bg.choices import check_choices
from bg.coordinates.com import ComCorrection, com_log_density
from bg.flows.base import Flow
from bg.flows.chain import run_chain

Tokens = Literal["atom", "coordinate"]


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

    def step(self, h: Tensor, cache: list[Tensor]) -> Tensor:
        """The next token ``(B, 1, C)`` given the keys and values of the earlier ones in ``cache`` (``[]`` or
        ``[k, v]``, each ``(B, heads, t, C / heads)``, extended in place): the same as ``forward`` over the whole
        prefix for its last position, in O(t) instead of O(t²) per token."""
        attn, b = self.attn, h.shape[0]
        q, k, v = nn.functional.linear(self.norm1(h), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
        q, k, v = (rearrange(y, "b t (n d) -> b n t d", n=attn.num_heads) for y in (q, k, v))
        if cache:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        cache[:] = [k, v]
        out = rearrange(nn.functional.scaled_dot_product_attention(q, k, v), "b n t d -> b t (n d)", b=b)
        h = h + attn.out_proj(out)
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
        return self._bound(out)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data → latent: z ``(B, T, D)`` and log|det ∂z/∂x| ``(B,)``."""
        if self.reverse:
            x = x.flip(1)
        a, b = self._params(x[:, :-1])
        z = (x - b) * torch.exp(-a)
        if self.reverse:
            z = z.flip(1)
        return z, -a.flatten(1).sum(1)

    def _bound(self, out: Tensor) -> tuple[Tensor, Tensor]:
        a, b = out.chunk(2, -1)
        return self.max_log_scale * torch.tanh(a / self.max_log_scale), b

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent → data, one token at a time: x ``(B, T, D)`` and log|det ∂x/∂z| ``(B,)``. Each token runs
        through the layers once, attending to the cached keys and values of the tokens before it (a KV cache,
        as in language-model decoding); differentiable like ``forward``."""
        if self.reverse:
            z = z.flip(1)
        xs: list[Tensor] = [z[:, 0]]  # token 0 sees nothing: a = b = 0
        log_det = z.new_zeros(z.shape[0])
        caches: list[list[Tensor]] = [[] for _ in self.layers]
        for i in range(1, z.shape[1]):
            h = self.embed(xs[-1][:, None]) + self.position[i - 1]
            for layer, cache in zip(self.layers, caches):
                h = layer.step(h, cache)
            a_i, b_i = self._bound(self.out(self.norm(h))[:, 0])
            xs.append(z[:, i] * torch.exp(a_i) + b_i)
            log_det = log_det + a_i.sum(-1)
        x = torch.stack(xs, 1)
        if self.reverse:
            x = x.flip(1)
        return x, log_det


class TarFlow(Flow):
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

    def log_prob(self, x: Tensor, context: Any = None) -> Tensor:
        """log q(x) ``(B,)`` of sequences ``(B, T, D)``."""
        z, log_det = self(x)
        return self.prior_log_prob(z) + log_det

    def sample(self, n: int, context: Any = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples ``(n, T, D)`` and their log q ``(n,)`` (reparameterised: differentiable)."""
        z = self.sample_latent(n, generator)
        x, log_det = self.inverse(z)
        return x, self.prior_log_prob(z) - log_det

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.n_tokens, self.token_dim, generator=generator, dtype=self.dtype, device=self.device)

    def latent_log_prob(self, z: Tensor) -> Tensor:
        return self.prior_log_prob(z)

    def from_latent(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.inverse(z.to(self.dtype))

    def to_latent(self, x: Tensor) -> Tensor:
        return self(x.to(self.dtype))[0]


class CartesianTarFlow(Flow):
    """A TarFlow over the 3N numbers of centred, scaled frames ``(B, N, 3)`` with their CoM (module docstring).

    The flow is trained on frames with CoM noise N(0, σ² I₃) (σ = ``com_sigma``, default 1/√N: the CoM
    spread of the N(0, I) prior), so its samples carry a CoM c. ``sample`` returns them with it and log q
    of the frame as log q_flow(x) − log h(c), h chosen by ``com_correction``; ``log_prob`` of frames
    (which carry no CoM information) evaluates the flow at their CoM with the Gaussian h, a
    deterministic estimate for NLLs. Both are float64.

    Args:
        n_atoms: N.
        tokens: ``"atom"`` (N tokens of 3 numbers) or ``"coordinate"`` (3N tokens of 1, very small molecules).
        com_sigma: CoM noise std per axis in flow units; ``None``: 1/√N.
        com_correction: ``"gaussian"``, ``"chi3"`` or ``"none"`` (``bg.coordinates.com``).
        **tarflow: ``channels``, ``blocks``, ``layers``, ``heads``, ``mlp_ratio``, ``max_log_scale`` of :class:`TarFlow`.
    """

    def __init__(self, n_atoms: int, tokens: Tokens = "atom", com_sigma: float | None = None,
                 com_correction: ComCorrection = "gaussian", **tarflow: Any):
        super().__init__()
        check_choices(CartesianTarFlow.__init__, dict(tokens=tokens, com_correction=com_correction))
        if com_sigma is not None and com_sigma <= 0:
            raise ValueError(f"com_sigma must be positive, got {com_sigma}")
        self.n_atoms, self.com_correction = n_atoms, com_correction
        self.com_sigma = com_sigma if com_sigma is not None else 1.0 / math.sqrt(n_atoms)
        self.token_shape = (n_atoms, 3) if tokens == "atom" else (3 * n_atoms, 1)
        self.net = TarFlow(*self.token_shape, **tarflow)

    def net_log_prob(self, x: Tensor) -> Tensor:
        """log q_flow ``(B,)`` of flow-unit frames ``(B, N, 3)`` over all 3N numbers (CoM included), float64."""
        return self.net.log_prob(x.to(self.dtype).reshape(len(x), *self.token_shape)).double()

    def net_sample(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` reparameterised flow samples ``(n, N, 3)`` with their CoM and log q_flow ``(n,)`` over all 3N
        numbers (float64)."""
        x, log_q = self.net.sample(n)
        return x.reshape(n, self.n_atoms, 3).double(), log_q.double()

    def com_log_density(self, x: Tensor, correction: ComCorrection | None = None) -> Tensor:
        """log h(c) ``(B,)`` of the CoM of flow-unit frames (``correction`` defaults to ``com_correction``)."""
        return com_log_density(x, self.com_sigma, correction or self.com_correction)

    def sample(self, n: int, context: Any = None) -> tuple[Tensor, Tensor]:
        x, log_q = self.net_sample(n)
        return x, log_q - self.com_log_density(x)

    def sample_latent(self, n: int) -> Tensor:
        return self.net.sample_latent(n)

    def latent_log_prob(self, z: Tensor) -> Tensor:
        return self.net.prior_log_prob(z).double()

    def from_latent(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent → flow-unit frames with their CoM; the log-determinant includes log h(c), so that
        ``latent_log_prob(z)`` − it is the frame's extended-space log q, as in ``sample``."""
        x, log_det = self.net.from_latent(z)
        x = x.reshape(len(z), self.n_atoms, 3).double()
        return x, log_det.double() + self.com_log_density(x)

    def log_prob(self, y: Tensor, context: Any = None) -> Tensor:
        y = y.double()
        return self.net_log_prob(y) - self.com_log_density(y, "gaussian")


class FrameTarFlow(Flow):
    """A TarFlow over body-frame coordinates ``(B, N − 2, 3)`` (``bg.coordinates.FrameCoordinates``): the
    rigid-body motion is removed by the representation, so no CoM correction and no augmentation; log q
    is the flow's own (float64).

    Args:
        n_atoms: N.
        tokens: ``"atom"`` (N − 2 tokens of 3 numbers) or ``"coordinate"`` (3N − 6 tokens of 1).
        **tarflow: ``channels``, ``blocks``, ``layers``, ``heads``, ``mlp_ratio``, ``max_log_scale`` of :class:`TarFlow`.
    """

    def __init__(self, n_atoms: int, tokens: Tokens = "atom", **tarflow: Any):
        super().__init__()
        check_choices(FrameTarFlow.__init__, dict(tokens=tokens))
        self.shape = (n_atoms - 2, 3)
        self.token_shape = self.shape if tokens == "atom" else (3 * n_atoms - 6, 1)
        self.net = TarFlow(*self.token_shape, **tarflow)

    def log_prob(self, y: Tensor, context: Any = None) -> Tensor:
        return self.net.log_prob(y.to(self.dtype).reshape(len(y), *self.token_shape)).double()

    def sample(self, n: int, context: Any = None) -> tuple[Tensor, Tensor]:
        y, log_q = self.net.sample(n)
        return y.reshape(n, *self.shape).double(), log_q.double()

    def sample_latent(self, n: int) -> Tensor:
        return self.net.sample_latent(n)

    def latent_log_prob(self, z: Tensor) -> Tensor:
        return self.net.prior_log_prob(z).double()

    def from_latent(self, z: Tensor) -> tuple[Tensor, Tensor]:
        y, log_det = self.net.from_latent(z)
        return y.reshape(len(z), *self.shape).double(), log_det.double()

    def to_latent(self, y: Tensor) -> Tensor:
        return self.net.to_latent(y.reshape(len(y), *self.token_shape))
