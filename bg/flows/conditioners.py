"""Conditioners: networks that map the conditioning coordinates to spline parameters.

Both can run their hidden layers in bfloat16 while training (``precision="bfloat16"``: ``torch.autocast``
around everything after the input layer; the input features and the returned parameters stay in the
caller's dtype, and in eval mode everything is float32). On CPUs with AMX (and on GPUs) bfloat16 matrix
products run 3–6× faster than float32 ones; sampling and evaluation, which judge the flow, do not use them.

Both take the current coordinates ``z`` ``(B, D)`` with the entries being transformed masked out
(``mask`` True where transformed), and return parameters ``(B, D, P)`` for every coordinate, or
``(B, M, P)`` for the coordinates ``rows`` ``(M,)`` alone (what a coupling transforms: the output layer
then computes only those, a third of its work or less in a coupling that moves half a channel).
Circular coordinates enter as (cos, sin), bounded ones as their value scaled to [−1, 1].

- :class:`MLPConditioner`: the baseline NSF conditioner (flattened features → residual MLP).
- :class:`GAUConditioner`: one token per residue (the features of its coordinates, with their
  kinds) or per coordinate; absolute (sinusoidal or learned) position of the residue added to the
  tokens and rotary embeddings of the residue index in the attention (Kim et al. 2024), mixed by
  gated attention units (Hua et al. 2022): u = SiLU(W_u x), v = SiLU(W_v x), shared z = SiLU(W_z x) with per-dim
  scale/offset for queries and keys, attention relu(q·k/√s)²/T, output W_o(u ⊙ A v). Attention
  over coordinates lets distant residues condition each other.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from bg.choices import check_choices


AbsoluteEmbedding = Literal["sinusoidal", "learned", "none"]
Precision = Literal["float32", "bfloat16"]


def _hidden_precision(module: nn.Module, x: Tensor) -> torch.autocast:
    """bfloat16 autocast over a conditioner's hidden layers when it trains with ``precision="bfloat16"``."""
    return torch.autocast(x.device.type, dtype=torch.bfloat16,
                          enabled=module.precision == "bfloat16" and module.training)


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

    def __init__(self, dim: int, n_params: int, hidden: int = 256, depth: int = 2, precision: Precision = "float32"):
        super().__init__()
        check_choices(MLPConditioner.__init__, dict(precision=precision), "MLP ")
        self.dim, self.n_params, self.precision = dim, n_params, precision
        self.inp = nn.Linear(3 * dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(),
                                                  nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Linear(hidden, dim * n_params)
        nn.init.zeros_(self.out.weight)  # start near the identity map
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Tensor, rows: Tensor | None = None) -> Tensor:
        """Parameters ``(B, D, P)``, or ``(B, M, P)`` of the coordinates ``rows`` ``(M,)``."""
        h = self.inp(features.flatten(1))
        with _hidden_precision(self, h):
            for block in self.blocks:
                h = h + block(h)
            if rows is None:
                out = self.out(h).view(-1, self.dim, self.n_params)
            else:
                weight = self.out.weight.view(self.dim, self.n_params, -1).index_select(0, rows).flatten(0, 1)
                bias = self.out.bias.view(self.dim, self.n_params).index_select(0, rows).flatten()
                out = nn.functional.linear(h, weight, bias).view(-1, len(rows), self.n_params)
        return out.to(features.dtype)


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

    def forward(self, x: Tensor, positions: Tensor | None) -> Tensor:
        """``positions``: ``(T,)`` integer positions for rotary embeddings, or None for none."""
        h = self.norm(x)
        u, v = nn.functional.silu(self.uv(h)).chunk(2, -1)
        z = nn.functional.silu(self.z(h))
        q, k = z * self.gamma[0] + self.beta[0], z * self.gamma[1] + self.beta[1]
        if positions is not None:
            q, k = rotary(q, positions), rotary(k, positions)
        attn = torch.relu(q @ k.transpose(-1, -2) / math.sqrt(self.s)) ** 2 / x.shape[1]
        return x + self.out(u * (attn @ v))


GAUTokens = Literal["residue", "coordinate"]


class GAUConditioner(nn.Module):
    """Gated-attention conditioner (see module docstring).

    Tokens are residues by default: a residue's token carries the features of all its coordinates
    (slots in a fixed order, with a one-hot of each slot's kind; empty slots are zero) and emits
    the spline parameters of all of them. Attention then costs O(R²) in the number of residues R,
    which keeps proteins affordable; ``tokens="coordinate"`` makes every coordinate its own token
    (O(D²), closer to a per-coordinate transformer, and much slower on CPU).

    Args:
        kinds: ``(D,)`` int kind of each coordinate (0 bond, 1 angle, 2 torsion; up to ``n_kinds``).
        residues: ``(D,)`` residue index of each coordinate (positions for both embeddings).
        n_params: parameters per coordinate.
        width, depth: token width and number of GAU layers.
        attention_dim: shared query/key width s of the GAU.
        absolute: absolute positional embedding of the residue index: ``"sinusoidal"``,
            ``"learned"`` or ``"none"``.
        rotary: rotary embeddings of the residue index inside the attention.
        tokens: ``"residue"`` or ``"coordinate"``.
        precision: ``"bfloat16"``: the GAU layers and the output layer in bfloat16 while training (module docstring).
    """

    def __init__(self, kinds: Tensor, residues: Tensor, n_params: int, width: int = 64, depth: int = 2,
                 n_kinds: int = 3, attention_dim: int = 32, absolute: AbsoluteEmbedding = "sinusoidal",
                 rotary: bool = True, tokens: GAUTokens = "residue", precision: Precision = "float32"):
        super().__init__()
        check_choices(GAUConditioner.__init__, dict(absolute=absolute, tokens=tokens, precision=precision), "GAU ")
        self.precision = precision
        kinds, residues = kinds.long(), residues.long()
        d = len(kinds)
        if tokens == "coordinate":
            token_of, slot_of, positions = torch.arange(d), torch.zeros(d, dtype=torch.long), residues
        else:
            positions, token_of = torch.unique(residues, return_inverse=True)
            slot_of = torch.zeros(d, dtype=torch.long)
            for t in range(len(positions)):
                members = torch.nonzero(token_of == t).flatten()
                slot_of[members] = torch.arange(len(members))
        n_tokens, n_slots = int(token_of.max()) + 1, int(slot_of.max()) + 1
        self.n_tokens, self.n_slots, self.n_params = n_tokens, n_slots, n_params
        self.register_buffer("cell", token_of * n_slots + slot_of)  # flat (token, slot) of each coordinate
        self.register_buffer("positions", positions)
        slot_kind = torch.zeros(n_tokens * n_slots, n_kinds)
        slot_kind[self.cell, kinds] = 1.0
        self.register_buffer("slot_kind", slot_kind.view(n_tokens, n_slots * n_kinds))
        # the coordinate in each (token, slot) cell, or d (a zero row) where the cell is empty: the grid is one
        # index_select instead of a write into a zero grid; derived from ``cell``, so not saved
        source = torch.full((n_tokens * n_slots,), d, dtype=torch.long)
        source[self.cell] = torch.arange(d)
        self.register_buffer("_source", source, persistent=False)
        self.embed = nn.Linear(n_slots * (3 + n_kinds), width)
        # Absolute position of the token's residue: fixed sinusoids, learned per residue, or none.
        self.register_buffer("position", sinusoidal(positions, width) if absolute == "sinusoidal"
                             else torch.zeros(n_tokens, width))
        self.learned = nn.Embedding(int(positions.max()) + 1, width) if absolute == "learned" else None
        if self.learned is not None:
            nn.init.normal_(self.learned.weight, std=0.02)
        self.use_rotary = rotary
        self.layers = nn.ModuleList(GatedAttentionUnit(width, s=attention_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, n_slots * n_params)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self._plan: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # see _output_plan

    def _output_plan(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """How to compute the outputs of ``rows`` alone: the tokens that own any of them ``(T',)``, the slot of
        each output ``(T', M')`` (per token, padded to the largest count M' with slot 0), and where each row's
        parameters land in the flattened ``(T' M')`` outputs ``(M,)``. Made once per ``rows`` (a coupling
        passes the same buffer every call) and kept."""
        if self._plan is not None and self._plan[0] is rows:
            return self._plan[1:]
        token, slot = (self.cell[rows] // self.n_slots).tolist(), (self.cell[rows] % self.n_slots).tolist()
        owners = sorted(set(token))
        slots_of = {t: [s for tt, s in zip(token, slot) if tt == t] for t in owners}
        width = max(len(v) for v in slots_of.values())
        slots = torch.tensor([v + [0] * (width - len(v)) for v in (slots_of[t] for t in owners)])
        index, seen, where = {t: i for i, t in enumerate(owners)}, dict.fromkeys(owners, 0), []
        for t in token:
            where.append(index[t] * width + seen[t])
            seen[t] += 1
        device = rows.device
        self._plan = (rows, torch.tensor(owners, device=device), slots.to(device), torch.tensor(where, device=device))
        return self._plan[1:]

    def forward(self, features: Tensor, rows: Tensor | None = None) -> Tensor:
        """Parameters ``(B, D, P)`` of every coordinate, or ``(B, M, P)`` of the coordinates ``rows`` ``(M,)``."""
        b = features.shape[0]
        grid = torch.cat([features, features.new_zeros(b, 1, features.shape[-1])], 1).index_select(1, self._source)
        grid = rearrange(grid, "b (t s) f -> b t (s f)", t=self.n_tokens)  # one token: its slots side by side
        tokens = torch.cat([grid, self.slot_kind.to(features.dtype).expand(b, -1, -1)], -1)
        x = self.embed(tokens) + self.position.to(features.dtype)
        if self.learned is not None:
            x = x + self.learned(self.positions)
        positions = self.positions if self.use_rotary else None
        with _hidden_precision(self, x):
            for layer in self.layers:
                x = layer(x, positions)
            if rows is None:
                out = rearrange(self.out(self.norm(x)), "b t (s p) -> b (t s) p", p=self.n_params)
                return out.index_select(1, self.cell).to(features.dtype)
            # One product per token with the output rows of its wanted slots only (a batched matmul over tokens).
            owners, slots, where = self._output_plan(rows)
            p = self.n_params
            weight = self.out.weight.view(self.n_slots, p, -1)[slots].flatten(1, 2)  # (T', M' P, width)
            bias = self.out.bias.view(self.n_slots, p)[slots].flatten(1)[:, None]  # (T', 1, M' P)
            h = self.norm(x).index_select(1, owners).transpose(0, 1)  # (T', B, width)
            out = torch.baddbmm(bias, h, weight.transpose(1, 2))  # (T', B, M' P)
        out = rearrange(out, "t b (m p) -> b (t m) p", p=p)
        return out.index_select(1, where).to(features.dtype)
