"""Body-frame Cartesian coordinates: a frame with its rigid-body motion removed exactly.

Three bonded root atoms fix the frame: ``a`` at the origin, ``b`` on the +x axis, ``c`` in the xy-plane
with y > 0 (the molecule's own N–CA–C by default, from the Z-matrix, with CA as ``a``). Every other atom
keeps its three Cartesian coordinates in that frame. Of the 3N numbers, 3N − 6 remain:

    r = |b − a|,  (c_x, c_y) of c,  and (x, y, z) of the N − 3 other atoms,

and the flow sees them as N − 2 tokens of three, ``(log r, c_x, log c_y)`` first and the other atoms
after it in Z-matrix order (parents before children), each entry standardised by the mean and standard
deviation that ``fit`` measures on training frames. The logarithms make the space unbounded (r, c_y > 0).

Unlike centred Cartesian frames (``CartesianCoordinates``), the representation is invariant to rotations
*and* translations, so a flow needs no augmentation and no centre-of-mass correction; a mirror image is a
different point (z → −z), so chirality is kept. It is a bijection between the quotient of Cartesian
space by rigid motions and R^{3N−6}, with the volume element of ``bg.coordinates.internal``
(translations removed, rotations measured by the Haar measure of SO(3) normalised to 8π²): placing b at
distance r costs r² (a sphere), placing c at distance c_y from the a–b axis costs c_y (a circle), so

    log|det ∂y/∂x| = −2 log r − log c_y − log r − log c_y − Σ log std        (``forward``)

(the middle two from the logarithms) and ``inverse`` returns its negative. A flow density q(y) thus gives
the Cartesian density log q(x) = log q(y) + log|det ∂y/∂x| in the same convention as the internal
coordinates, up to the constant log 8π² that cancels in importance weights. ``inverse`` returns
frames centred at the origin (the centroid of all atoms), in the body frame's orientation.
"""

from __future__ import annotations

import mdtraj as md
import numpy as np
import torch
from torch import Tensor, nn

from bg.coordinates.com import centred
from bg.coordinates.zmatrix import ZMatrix, build_zmatrix


def default_roots(topology: md.Topology, zmatrix: ZMatrix | None = None) -> tuple[int, int, int]:
    """(a, b, c) atom indices from the Z-matrix's first three atoms (``zmatrix``: the topology's, built when not
    given): ``c`` is the third placed atom and ``a`` the root it is bonded to, so a–b and a–c are bonds and the
    angle b–a–c is a bond angle."""
    zm = zmatrix if zmatrix is not None else build_zmatrix(topology)
    first, second, third = (int(i) for i in zm.order[:3])
    a = int(zm.refs[2, 0])
    b = second if a == first else first
    return a, b, third


class FrameCoordinates(nn.Module):
    """x ``(B, N, 3)`` nm ↔ y ``(B, N − 2, 3)`` standardised body-frame coordinates (module docstring).

    Args:
        topology: mdtraj topology of one bonded molecule (N ≥ 3 atoms).
        roots: the (a, b, c) atoms that fix the frame (``None``: :func:`default_roots`); a–b must not be
            collinear with c in any frame.
    """

    def __init__(self, topology: md.Topology, roots: tuple[int, int, int] | None = None):
        super().__init__()
        n = topology.n_atoms
        if n < 3:
            raise ValueError(f"FrameCoordinates needs at least 3 atoms, got {n}")
        zm = build_zmatrix(topology)
        roots = tuple(int(i) for i in (roots if roots is not None else default_roots(topology, zm)))
        if len(set(roots)) != 3 or not all(0 <= i < n for i in roots):
            raise ValueError(f"roots must be three distinct atom indices in [0, {n}), got {roots}")
        order = [int(i) for i in zm.order if int(i) not in roots]
        self.n_atoms, self.roots = n, roots
        self.register_buffer("others", torch.tensor(order, dtype=torch.long), persistent=False)
        # standardisation, fitted to data; buffers so that they travel with checkpoints
        self.register_buffer("mean", torch.zeros(n - 2, 3, dtype=torch.float64))
        self.register_buffer("std", torch.ones(n - 2, 3, dtype=torch.float64))

    @property
    def dim(self) -> int:
        """Degrees of freedom: 3N − 6."""
        return 3 * self.n_atoms - 6

    def body(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unstandardised body-frame tokens ``(B, N − 2, 3)`` (nm, logs of nm) and log|det| ``(B,)`` of x → them."""
        a, b, c = (x[:, i] for i in self.roots)
        ab, ac = b - a, c - a
        r = torch.linalg.vector_norm(ab, dim=-1)
        e1 = ab / r[:, None]
        cx = (ac * e1).sum(-1)
        perp = ac - cx[:, None] * e1
        cy = torch.linalg.vector_norm(perp, dim=-1)
        e2 = perp / cy[:, None]
        e3 = torch.linalg.cross(e1, e2, dim=-1)
        rot = torch.stack([e1, e2, e3], 1)  # rows: the body axes
        local = (x[:, self.others] - a[:, None]) @ rot.transpose(1, 2)
        head = torch.stack([torch.log(r), cx, torch.log(cy)], -1)[:, None]
        return torch.cat([head, local], 1), -3 * torch.log(r) - 2 * torch.log(cy)

    @torch.no_grad()
    def fit(self, x: Tensor | np.ndarray) -> "FrameCoordinates":
        """Set the per-entry mean and standard deviation from training frames ``(F, N, 3)`` nm."""
        x = torch.as_tensor(x, dtype=torch.float64, device=self.mean.device)
        z = torch.cat([self.body(chunk)[0] for chunk in x.split(4096)])
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0).clamp_min(1e-6) if len(z) > 1 else torch.ones_like(self.std))
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"expected positions of shape (batch, {self.n_atoms}, 3), got {tuple(x.shape)}")
        z, log_det = self.body(x)
        mean, std = self.mean.to(z.dtype), self.std.to(z.dtype)
        return (z - mean) / std, log_det - torch.log(std).sum()

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = self.mean.to(y.dtype), self.std.to(y.dtype)
        z = y * std + mean
        r, cx, cy = torch.exp(z[:, 0, 0]), z[:, 0, 1], torch.exp(z[:, 0, 2])
        zero = torch.zeros_like(r)
        x = y.new_zeros(len(y), self.n_atoms, 3)
        x[:, self.roots[1]] = torch.stack([r, zero, zero], -1)
        x[:, self.roots[2]] = torch.stack([cx, cy, zero], -1)
        x[:, self.others] = z[:, 1:]
        return centred(x), 3 * torch.log(r) + 2 * torch.log(cy) + torch.log(std).sum()
