"""E(n)-equivariant graph network (Satorras, Hoogeboom & Welling 2021) as the time-dependent vector
field of a continuous normalizing flow (equivariant flow matching, Klein, Krämer & Noé 2023; TBG,
Klein & Noé 2024).

The graph is fully connected over the N atoms. Node features start from embedded atom tokens
(``bg.systems.encodings``) and the time t; every layer forms messages from invariants only

    m_ij = φ_e(A h_i + A h_j, |x_i − x_j|², |x⁰_i − x⁰_j|²)   (x⁰: the input positions; m_ij = m_ji)
    m_ij ← m_ij · sigmoid(a(m_ij))                           (edge gate, "attention")
    x_i ← x_i + Σ_j (x_i − x_j)/(|x_i − x_j| + 1) · φ_x(m_ij) / (N − 1)
    h_i ← h_i + φ_h(h_i, Σ_j m_ij / (N − 1))

and the velocity is x_L − x⁰ with its mean over atoms removed. Because only differences of positions
enter, each multiplied by an invariant, the field is equivariant to rotations and reflections,
invariant to translations, and equivariant to permutations of atoms with identical tokens — by
construction, not by training.

Symmetric messages halve the work (each unordered pair once) and make Σ_i v_i = 0 exact; the first
linear map of φ_e is applied per node and gathered per pair (N·H² instead of P·2H² multiply-adds).
``coord_hidden=False`` drops the hidden layer of φ_x (cheaper, notably for the exact divergence).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bg.coordinates import centred


class EGNNLayer(nn.Module):
    """One EGNN layer over the P = N(N−1)/2 unordered atom pairs (i < j).

    Messages are symmetric (m_ij = m_ji: the first linear map is shared between h_i and h_j), so each
    pair is computed once and the coordinate updates of i and j are equal and opposite, which keeps
    the mean of the positions fixed exactly.
    """

    def __init__(self, hidden: int, coord_hidden: bool = True):
        super().__init__()
        self.edge_h = nn.Linear(hidden, hidden)
        self.edge_d = nn.Linear(2, hidden, bias=False)
        self.edge_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.gate = nn.Linear(hidden, 1)
        self.coord = (nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)) if coord_hidden
                      else nn.Sequential(nn.Linear(hidden, 1)))
        self.node = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # A small last coordinate layer keeps an untrained field small and smooth.
        nn.init.normal_(self.coord[-1].weight, std=1e-3)
        nn.init.zeros_(self.coord[-1].bias)

    def forward(self, h: Tensor, x: Tensor, d0: Tensor, i: Tensor, j: Tensor) -> tuple[Tensor, Tensor]:
        """h ``(B, N, H)``, x ``(B, N, 3)``, d0 ``(B, P, 1)`` squared input distances, pair indices i, j ``(P,)``."""
        n = x.shape[-2]
        diff = x[:, i] - x[:, j]  # (B, P, 3)
        d2 = diff.square().sum(-1, keepdim=True)
        a = self.edge_h(h)
        m = self.edge_out(a[:, i] + a[:, j] + self.edge_d(torch.cat([d2, d0], -1)))
        m = m * torch.sigmoid(self.gate(m))
        # +1 keeps the normalised direction smooth where atoms come close
        push = diff / (torch.sqrt(d2 + 1e-12) + 1.0) * self.coord(m) / (n - 1)
        x = x.index_add(1, i, push).index_add(1, j, -push)
        agg = torch.zeros_like(h).index_add(1, i, m).index_add(1, j, m) / (n - 1)
        h = h + self.node(torch.cat([h, agg], -1))
        return h, x


class EGNN(nn.Module):
    """Equivariant vector field v(t, x) over the atoms of a molecule.

    Args:
        tokens: atom tokens ``(N, C)`` (``bg.systems.encodings.atom_tokens``) of the molecule the field is for,
            or ``None`` for a transferable field that gets each molecule's tokens with the call.
        vocab_sizes: vocabulary size of each token column (global vocabularies: any peptide's tokens fit).
        hidden: node and edge feature width H.
        layers: number of EGNN layers.

    ``forward(t, x, tokens=None)``: t scalar or ``(B,)`` in [0, 1], x ``(B, N, 3)`` (flow units) → v ``(B, N, 3)``
    with zero mean over atoms; ``tokens`` ``(N, C)`` of the molecule x holds (default: the ones given at
    construction). The weights do not depend on N, so one field serves molecules of any size
    (:meth:`bind` fixes the molecule for a ``ContinuousFlow``).
    """

    def __init__(self, tokens: Tensor | None, vocab_sizes: Sequence[int], hidden: int = 64, layers: int = 5,
                 coord_hidden: bool = True):
        super().__init__()
        self.vocab_sizes = tuple(vocab_sizes)
        if tokens is not None:
            self._check(tokens)
            self.register_buffer("tokens", tokens.long().clone(), persistent=False)
        else:
            self.tokens = None
        self.embed = nn.ModuleList(nn.Embedding(v, hidden) for v in vocab_sizes)
        self.time = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList(EGNNLayer(hidden, coord_hidden) for _ in range(layers))
        self._pairs: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    def _check(self, tokens: Tensor) -> None:
        if tokens.ndim != 2 or tokens.shape[1] != len(self.vocab_sizes):
            raise ValueError(f"tokens must be (N, {len(self.vocab_sizes)}), got {tuple(tokens.shape)}")
        if len(tokens) < 2:
            raise ValueError("an EGNN needs at least 2 atoms")
        too_big = [k for k, v in enumerate(self.vocab_sizes) if int(tokens[:, k].max()) >= v]
        if too_big or int(tokens.min()) < 0:
            raise ValueError(f"token column(s) {too_big} outside the vocabulary sizes {self.vocab_sizes}")

    @property
    def n_atoms(self) -> int:
        if self.tokens is None:
            raise ValueError("a transferable EGNN (tokens=None) has no fixed number of atoms")
        return len(self.tokens)

    def pairs(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Indices i < j ``(P,)`` of the N(N−1)/2 unordered atom pairs (cached per N and device)."""
        key = (n, device)
        if key not in self._pairs:
            self._pairs[key] = tuple(torch.triu_indices(n, n, 1, device=device))
        return self._pairs[key]

    def forward(self, t: Tensor, x: Tensor, tokens: Tensor | None = None) -> Tensor:
        tokens = self.tokens if tokens is None else tokens
        if tokens is None:
            raise ValueError("a transferable EGNN needs the molecule's tokens: field(t, x, tokens)")
        if len(tokens) != x.shape[-2]:
            raise ValueError(f"{len(tokens)} atom tokens for frames of {x.shape[-2]} atoms")
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(b, 1)
        h = sum(e(tokens[:, k]) for k, e in enumerate(self.embed)).to(x.dtype)
        h = h.unsqueeze(0) + self.time(t).unsqueeze(1)  # (B, N, H)
        i, j = self.pairs(x.shape[-2], x.device)
        d0 = (x[:, i] - x[:, j]).square().sum(-1, keepdim=True)
        y = x
        for layer in self.layers:
            h, y = layer(h, y, d0, i, j)
        return centred(y - x)

    def bind(self, tokens: Tensor) -> "BoundField":
        """This field for one molecule: a module ``(t, x) → v`` sharing these weights."""
        self._check(tokens)
        return BoundField(self, tokens)


class BoundField(nn.Module):
    """A transferable field fixed to one molecule's tokens (what ``ContinuousFlow`` integrates)."""

    def __init__(self, field: EGNN, tokens: Tensor):
        super().__init__()
        self.field = field
        self.register_buffer("tokens", tokens.long().clone(), persistent=False)

    @property
    def n_atoms(self) -> int:
        return len(self.tokens)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.field(t, x, self.tokens)
