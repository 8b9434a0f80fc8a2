"""Equivariant optimal-transport pairing of prior and data samples within a batch (Klein, Krämer &
Noé 2023): before the batch assignment, every (prior, data) pair is aligned by the rotation that
minimises their distance (Kabsch) and the identical atoms of the data sample are permuted to match
the prior sample; the assignment then minimises the summed squared distance of the aligned pairs.

Rotating or permuting identical atoms of a data frame does not change its probability under a
rotation- and permutation-invariant target, so the pairs are still samples of the data distribution;
they give straighter paths (shorter ODE integrations, easier regression).
"""

from __future__ import annotations

import functools
import itertools

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

#: Groups up to this size are matched exactly by trying every permutation for all pairs at once;
#: larger groups (e.g. all hydrogens under the ``element`` encoding) are matched by the Hungarian
#: algorithm on the assigned pairs only.
MAX_BRUTE_FORCE_GROUP = 5


def kabsch_rotations(x: Tensor, y: Tensor) -> Tensor:
    """Proper rotations R ``(..., 3, 3)`` minimising |x R − y|² for centred frames x, y ``(..., N, 3)``."""
    m = x.transpose(-1, -2) @ y
    u, _, vh = torch.linalg.svd(m)
    d = torch.sign(torch.linalg.det(u @ vh))
    d = torch.where(d == 0, torch.ones_like(d), d)
    diag = torch.ones(*d.shape, 3, dtype=x.dtype, device=x.device)
    diag[..., 2] = d
    return (u * diag.unsqueeze(-2)) @ vh


@functools.lru_cache(maxsize=None)
def _permutations(size: int) -> Tensor:
    """Every permutation of ``range(size)`` ``(size!, size)`` (CPU; built once per size)."""
    return torch.tensor(list(itertools.permutations(range(size))))


def _match_small_groups(x1: Tensor, x0: Tensor, groups: list[Tensor]) -> Tensor:
    """Best permutation index ``(..., N)`` of x1's atoms within each small group to match x0 (exhaustive)."""
    n = x1.shape[-2]
    index = torch.arange(n, device=x1.device).expand(*x1.shape[:-1]).clone()
    for g in groups:
        g = g.to(x1.device)
        perms = _permutations(len(g)).to(x1.device)  # (P, g)
        cand = g[perms]  # (P, g): atoms of x1 placed at g
        d = (x1[..., cand, :] - x0[..., g, :].unsqueeze(-3)).square().sum((-1, -2))  # (..., P)
        index[..., g] = cand[d.argmin(-1)]
    return index


def _match_large_groups(x1: Tensor, x0: Tensor, groups: list[Tensor]) -> Tensor:
    """Hungarian matching of x1's atoms within each group, per frame: index ``(B, N)``."""
    index = torch.arange(x1.shape[-2]).expand(len(x1), -1).clone()
    for b in range(len(x1)):
        for g in groups:
            cost = torch.cdist(x0[b, g].double(), x1[b, g].double()).square().cpu().numpy()
            _, cols = linear_sum_assignment(cost)
            index[b, g] = g[torch.as_tensor(cols)].cpu()
    return index.to(x1.device)


def _gather_atoms(x: Tensor, index: Tensor) -> Tensor:
    return torch.gather(x, -2, index.unsqueeze(-1).expand(*index.shape, 3))


def align(x1: Tensor, x0: Tensor, groups: list[Tensor]) -> Tensor:
    """Frames x1 ``(..., N, 3)`` rotated (Kabsch) and with identical atoms permuted to best match x0
    (centred frames): rotate, match atoms in that orientation, rotate again with the matched labels."""
    small = [g for g in groups if len(g) <= MAX_BRUTE_FORCE_GROUP]
    large = [g for g in groups if len(g) > MAX_BRUTE_FORCE_GROUP]
    y = x1 @ kabsch_rotations(x1, x0)
    if small:
        y = _gather_atoms(y, _match_small_groups(y, x0, small))
    if large:
        flat = y.reshape(-1, *y.shape[-2:])
        y = _gather_atoms(flat, _match_large_groups(flat, x0.expand_as(y).reshape(flat.shape), large)).reshape(y.shape)
    return y @ kabsch_rotations(y, x0)


def equivariant_ot_pairs(x0: Tensor, x1: Tensor, groups: list[Tensor], chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Pair prior samples x0 with data samples x1 (both centred ``(B, N, 3)``): returns x0 and, for each
    of its rows, the assigned data frame rotated and with identical atoms (``groups``) permuted to match.

    Cost: B² Kabsch alignments and exhaustive matching of small groups (vectorised); large groups are
    matched after the assignment (see ``MAX_BRUTE_FORCE_GROUP``). ``chunk``: pair within consecutive
    chunks of this many samples (chunk·B instead of B² alignments; the batch is in random order). ``groups``:
    atom-index tensors on any device (the models keep them on the CPU)."""
    b = len(x0)
    if chunk is not None and chunk < b:
        parts = [equivariant_ot_pairs(a, c, groups) for a, c in zip(x0.split(chunk), x1.split(chunk))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    with torch.no_grad():
        small = [g for g in groups if len(g) <= MAX_BRUTE_FORCE_GROUP]
        pair0 = x0.unsqueeze(1).expand(b, b, *x0.shape[1:])   # [i, j] = x0_i
        pair1 = x1.unsqueeze(0).expand(b, b, *x1.shape[1:])   # [i, j] = x1_j
        y = pair1 @ kabsch_rotations(pair1, pair0)
        if small:
            y = _gather_atoms(y, _match_small_groups(y, pair0, small))
        cost = (y - pair0).square().sum((-1, -2))
        _, cols = linear_sum_assignment(cost.double().cpu().numpy())
        cols = torch.as_tensor(cols, device=x1.device)
        return x0, align(x1[cols], x0, groups)
