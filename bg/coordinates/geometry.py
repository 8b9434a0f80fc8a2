"""Batched geometry in torch: distances, angles, dihedrals and the inverse placement (NeRF).

All functions take positions in nm with a leading batch shape and work in any float dtype.
The dihedral sign follows IUPAC and mdtraj (``mdtraj.compute_dihedrals``), so torsions computed
here and by mdtraj agree; ``place_atom`` is the exact inverse of (bond, angle, dihedral).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _safe_norm(v: Tensor, eps: float = 0.0) -> Tensor:
    return torch.linalg.vector_norm(v, dim=-1).clamp_min(eps) if eps else torch.linalg.vector_norm(v, dim=-1)


def bond_lengths(x0: Tensor, x1: Tensor) -> Tensor:
    """|x1 − x0| in nm; inputs ``(..., 3)``, output ``(...)``."""
    return torch.linalg.vector_norm(x1 - x0, dim=-1)


def bond_angles(x0: Tensor, x1: Tensor, x2: Tensor) -> Tensor:
    """Angle x0–x1–x2 at x1 in radians, in [0, π]; inputs ``(..., 3)``."""
    u = x0 - x1
    v = x2 - x1
    # atan2(|u×v|, u·v) keeps full precision near 0 and π, unlike acos.
    return torch.atan2(torch.linalg.vector_norm(torch.cross(u, v, dim=-1), dim=-1), (u * v).sum(-1))


def dihedrals(x0: Tensor, x1: Tensor, x2: Tensor, x3: Tensor) -> Tensor:
    """Dihedral x0–x1–x2–x3 in radians, in [−π, π], with mdtraj's sign convention."""
    b1 = x1 - x0
    b2 = x2 - x1
    b3 = x3 - x2
    c1 = torch.cross(b2, b3, dim=-1)
    c2 = torch.cross(b1, b2, dim=-1)
    p1 = (b1 * c1).sum(-1) * torch.linalg.vector_norm(b2, dim=-1)
    p2 = (c1 * c2).sum(-1)
    return torch.atan2(p1, p2)


def place_atom(p: Tensor, g: Tensor, d: Tensor, bond: Tensor, angle: Tensor, torsion: Tensor) -> Tensor:
    """Position of atom a from three placed atoms (NeRF).

    a is put at distance ``bond`` from ``p``, with angle a–p–g equal to ``angle`` and dihedral
    a–p–g–d equal to ``torsion`` (the convention of :func:`dihedrals`). ``p, g, d``: ``(..., 3)``;
    ``bond, angle, torsion``: ``(...)``. Returns ``(..., 3)``.
    """
    u = p - g
    u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    w = d - g
    w = w - (w * u).sum(-1, keepdim=True) * u
    w = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    n = torch.cross(u, w, dim=-1)
    b = bond.unsqueeze(-1)
    ca, sa = torch.cos(angle).unsqueeze(-1), torch.sin(angle).unsqueeze(-1)
    ct, st = torch.cos(torsion).unsqueeze(-1), torch.sin(torsion).unsqueeze(-1)
    # Unit vector from p to a: angle with (g − p) = −u, rotated by the torsion about u,
    # starting from the side of d (torsion 0 = cis).
    direction = -ca * u + sa * (ct * w + st * n)
    return p + b * direction


def wrap_angle(phi: Tensor) -> Tensor:
    """Map angles to [−π, π)."""
    return torch.remainder(phi + torch.pi, 2 * torch.pi) - torch.pi


def circular_mean(phi: Tensor, dim: int = 0) -> Tensor:
    """Circular mean (rad) of angles ``phi`` along ``dim``."""
    return torch.atan2(torch.sin(phi).mean(dim), torch.cos(phi).mean(dim))
