"""Internal coordinates: a bijection between Cartesian frames and bonds, angles and torsions.

``x`` (``(B, N, 3)`` nm) ↔ ``z`` (``(B, D)``): D = 3N − 6 in the full representation (the six
rigid-body degrees of freedom removed), fewer with ``reduced=True``. Layout of ``z``: all bonds
(nm), then all angles (rad, in (0, π)), then all torsions (rad, in [−π, π)); in the reduced
representation only the free entries, in the same order. Labels of every entry are in
``coordinate_table()`` and in the boolean/int buffers ``is_bond``, ``is_angle``, ``is_torsion``,
``is_backbone``, ``residue_index``, ``atom_index``.

Log-determinants. Placing an atom from (b, θ, φ) has Jacobian determinant b² sin θ, so on the
quotient of Cartesian space by rigid motions (translation removed, rotations measured by the Haar
measure of SO(3) normalised to 8π²)

    log|det ∂z/∂x| = −Σ_bonds 2 log b − Σ_angles log sin θ        (``forward``)

and ``inverse`` returns its negative. A flow density q_z(z) therefore gives the Cartesian
density log q(x) = log q_z(z) + log_det_forward(x), up to the constant log 8π² that cancels in
every importance weight. ``forward_full``/``inverse_full`` keep the six rigid-body coordinates
(translation t, orientation α, β, γ) and are square bijections of R^{3N}, with the extra factor
sin β; they exist to check the Jacobian against autograd.

Reduced representation (``reduced=True``): side-chain bond lengths and angles are frozen at their
means over the frames given to ``fit`` (the paper's reduced representation for proteins); only
side-chain torsions and all backbone coordinates are free. Rings (``rigid_rings``, the default) are
frozen whole: a bond that closes a ring (Phe CE2–CZ, Pro N–CD) is no coordinate, so with the ring's
angles at their means and its torsions free the closure bond would take every error (on villin up to
0.035 nm, 3e4 kT). The torsions that shape a ring are therefore frozen too, at the mean over the
frames of the ring's most populated conformation (Pro's pucker is bimodal; the mean of both modes
would be a flat ring that does not close). ``inverse`` rebuilds frozen entries
from the means, and both log-dets are those of the full transform evaluated *with the frozen
entries at their means*: the density of x on the manifold of rigid side-chain geometry, w.r.t.
the volume element of the free internal coordinates. ``forward`` of a frame whose side chains are
not at the means projects it onto that manifold (``inverse(forward(x))`` ≠ x there).

Frozen bonds (``frozen_bonds``): bond lengths held fixed by the MD, e.g. every bond to hydrogen under
``constraints: hbonds`` (``MolecularSystem.constrained_bonds``). Their data have no spread, so a flow must not
model them: they are frozen at their means like the reduced side chains (with or without ``reduced``), and
q is a density on the constraint manifold, the one the constrained MD samples (up to the small
configuration dependence of its mass-metric factor).
"""

from __future__ import annotations

import math

import mdtraj as md
import numpy as np
import torch
from torch import Tensor, nn

from bg.coordinates.geometry import bond_angles, bond_lengths, circular_mean, dihedrals, place_atom, wrap_angle
from bg.coordinates.zmatrix import ZMatrix, build_zmatrix, is_backbone_atom, small_rings

BOND, ANGLE, TORSION = 0, 1, 2
_KIND_NAMES = ("bond", "angle", "torsion")


class InternalCoordinates(nn.Module):
    """Bijection between Cartesian frames and internal coordinates (see module docstring).

    Args:
        topology: mdtraj topology of one bonded molecule (capped peptide or protein, any
            standard residue, or any other bonded molecule).
        reduced: freeze side-chain bonds and angles at their data means; requires ``fit``
            (or ``reference``) before use.
        reference: frames ``(F, N, 3)`` nm to compute the frozen means from (same as ``fit``).
        frozen_bonds: atom index pairs whose bond length is held fixed (constraints); the Z-matrix bond
            between them, where it is one, is frozen at its data mean (``fit``). A pair that is no bond of the
            Z-matrix (e.g. a constraint closing a ring) is an error.
        rigid_rings: with ``reduced``, also freeze the torsions that shape side-chain rings (see the module
            docstring); ``False`` gives the representation of checkpoints made before rings were rigid.
    """

    #: ring conformations within this many radians (every ring torsion) of the medoid count as its mode
    RING_MODE_WIDTH = 0.5

    def __init__(self, topology: md.Topology, reduced: bool = False, reference: Tensor | np.ndarray | None = None,
                 frozen_bonds: "list[tuple[int, int]] | tuple" = (), rigid_rings: bool = True):
        super().__init__()
        self.topology = topology
        self.reduced = reduced
        zm: ZMatrix = build_zmatrix(topology, closure_references=reduced and rigid_rings)
        self.zmatrix = zm
        n = zm.n_atoms
        order = torch.as_tensor(zm.order, dtype=torch.long)
        refs = torch.as_tensor(zm.refs, dtype=torch.long)
        self.register_buffer("roots", order[:3].clone(), persistent=False)
        # Per coordinate: the placed atom and its references.
        self.register_buffer("bond_idx", torch.stack([order[1:], refs[1:, 0]], -1), persistent=False)
        self.register_buffer("angle_idx", torch.stack([order[2:], refs[2:, 0], refs[2:, 1]], -1), persistent=False)
        self.register_buffer("torsion_idx", torch.stack([order[3:], refs[3:, 0], refs[3:, 1], refs[3:, 2]], -1), persistent=False)
        self.n_atoms = n
        nb, na, nt = n - 1, n - 2, n - 3
        self.n_bonds, self.n_angles, self.n_torsions = nb, na, nt

        atoms = list(topology.atoms)
        placed = torch.cat([order[1:], order[2:], order[3:]])
        kind = torch.cat([torch.full((nb,), BOND), torch.full((na,), ANGLE), torch.full((nt,), TORSION)])
        backbone = torch.tensor([is_backbone_atom(atoms[i]) for i in placed.tolist()])
        residue = torch.tensor([atoms[i].residue.index for i in placed.tolist()])
        free = torch.ones(len(kind), dtype=torch.bool)
        # ring id of every coordinate that is frozen as part of a rigid ring, −1 elsewhere
        ring_id = torch.full((len(kind),), -1, dtype=torch.long)
        if reduced:
            free = backbone | (kind == TORSION)
            if rigid_rings:
                rings = small_rings(topology, zm)
                ring_of = {atom: r for r, ring in enumerate(rings) for atom in ring}
                quads = self.torsion_idx.tolist()
                for k, atom in enumerate(placed.tolist()):
                    r = ring_of.get(atom, -1)
                    if r < 0:
                        continue
                    if kind[k] == TORSION:
                        # a torsion shapes the ring when three of its four atoms are ring atoms
                        if len(rings[r].intersection(quads[k - nb - na])) >= 3:
                            free[k], ring_id[k] = False, r
                    elif not free[k]:
                        ring_id[k] = r
        if len(frozen_bonds):
            bond_of = {frozenset(p): k for k, p in enumerate(self.bond_idx.tolist())}
            missing = [tuple(p) for p in frozen_bonds if frozenset(map(int, p)) not in bond_of]
            if missing:
                raise ValueError(f"frozen_bonds {missing[:5]} are not bonds of the Z-matrix (a constraint that closes "
                                 "a ring cannot be frozen in internal coordinates)")
            free[[bond_of[frozenset(map(int, p))] for p in frozen_bonds]] = False
        #: whether any coordinate is frozen (reduced side chains or frozen bonds): then ``fit`` is needed
        self.has_frozen = bool((~free).any())
        self.register_buffer("_kind_all", kind, persistent=False)
        self.register_buffer("_free", free, persistent=False)
        self.register_buffer("is_bond", kind[free] == BOND, persistent=False)
        self.register_buffer("is_angle", kind[free] == ANGLE, persistent=False)
        self.register_buffer("is_torsion", kind[free] == TORSION, persistent=False)
        self.register_buffer("is_backbone", backbone[free], persistent=False)
        self.register_buffer("residue_index", residue[free], persistent=False)
        self.register_buffer("atom_index", placed[free], persistent=False)
        self.register_buffer("_ring_id", ring_id[~free], persistent=False)
        self.register_buffer("_frozen_torsion", kind[~free] == TORSION, persistent=False)
        # Frozen means live in the state dict so that a checkpoint restores the same manifold.
        self.register_buffer("frozen_values", torch.full((int((~free).sum()),), float("nan"), dtype=torch.float64))

        self._levels = []
        for lev in np.unique(zm.levels[3:]):
            ks = np.nonzero(zm.levels[3:] == lev)[0]
            self._levels.append(torch.as_tensor(ks, dtype=torch.long))
        if reference is not None:
            self.fit(reference)

    # ------------------------------------------------------------------ info
    @property
    def dim(self) -> int:
        """Number of free internal coordinates (the flow's dimension)."""
        return int(self._free.sum())

    @property
    def is_fitted(self) -> bool:
        return not self.has_frozen or bool(torch.isfinite(self.frozen_values).all())

    def coordinate_table(self) -> list[dict]:
        """One dict per free coordinate: index, kind, atoms (names), residue, backbone flag."""
        atoms = list(self.topology.atoms)
        full_atoms = [tuple(r) for r in self.bond_idx.tolist()] + [tuple(r) for r in self.angle_idx.tolist()] + [
            tuple(r) for r in self.torsion_idx.tolist()
        ]
        rows = []
        for j, k in enumerate(torch.nonzero(self._free).flatten().tolist()):
            names = [f"{atoms[i].residue.name}{atoms[i].residue.resSeq}:{atoms[i].name}" for i in full_atoms[k]]
            rows.append(
                dict(index=j, kind=_KIND_NAMES[int(self._kind_all[k])], atoms=names, atom_indices=full_atoms[k],
                     residue=int(self.residue_index[j]), backbone=bool(self.is_backbone[j]))
            )
        return rows

    def torsion_index(self, a: int, b: int, c: int, d: int) -> int:
        """Index in ``z`` of the torsion a–b–c–d (either direction); ``KeyError`` if not a coordinate."""
        t = self.torsion_idx.tolist()
        free_pos = torch.cumsum(self._free.long(), 0) - 1
        for k, quad in enumerate(t):
            if quad == [a, b, c, d] or quad == [d, c, b, a]:
                return int(free_pos[self.n_bonds + self.n_angles + k])
        raise KeyError(f"the dihedral {(a, b, c, d)} is not an internal coordinate of this Z-matrix")

    def phi_psi_indices(self) -> tuple[Tensor, Tensor]:
        """z indices of the backbone φ and ψ torsions, in mdtraj's residue order."""
        traj = md.Trajectory(np.zeros((1, self.n_atoms, 3), dtype=np.float32), self.topology)
        phi = md.compute_phi(traj)[0]
        psi = md.compute_psi(traj)[0]
        return (
            torch.tensor([self.torsion_index(*q) for q in phi.tolist()], dtype=torch.long),
            torch.tensor([self.torsion_index(*q) for q in psi.tolist()], dtype=torch.long),
        )

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def fit(self, x: Tensor | np.ndarray) -> "InternalCoordinates":
        """Set the frozen coordinates to their means over frames ``x`` (``(F, N, 3)`` nm): side-chain
        bonds/angles and frozen bonds over all frames; a rigid ring's coordinates over the frames of its
        most populated conformation. Torsions take the circular mean."""
        if not self.has_frozen:
            return self
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=torch.float64)
        self._check_shape(x)
        full = self._all_coordinates(x.to(self.bond_idx.device))
        frozen = full[:, ~self._free]
        if not torch.isfinite(frozen).all():
            raise ValueError("frames passed to fit() contain non-finite coordinates")
        values = _mean(frozen, self._frozen_torsion)
        for r in torch.unique(self._ring_id[self._ring_id >= 0]).tolist():
            cols = self._ring_id == r
            members = _main_mode(frozen[:, cols & self._frozen_torsion], self.RING_MODE_WIDTH)
            values[cols] = _mean(frozen[members][:, cols], self._frozen_torsion[cols])
        self.frozen_values.copy_(values)
        return self

    # ------------------------------------------------------------------ transforms
    def _check_shape(self, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"expected positions of shape (batch, {self.n_atoms}, 3), got {tuple(x.shape)}")

    def _all_coordinates(self, x: Tensor) -> Tensor:
        bi, ai, ti = self.bond_idx, self.angle_idx, self.torsion_idx
        b = bond_lengths(x[:, bi[:, 1]], x[:, bi[:, 0]])
        a = bond_angles(x[:, ai[:, 0]], x[:, ai[:, 1]], x[:, ai[:, 2]])
        t = dihedrals(x[:, ti[:, 0]], x[:, ti[:, 1]], x[:, ti[:, 2]], x[:, ti[:, 3]])
        return torch.cat([b, a, t], dim=-1)

    def _expand(self, z: Tensor) -> Tensor:
        if not self.has_frozen:
            return z
        if not self.is_fitted:
            raise RuntimeError("reduced internal coordinates (or frozen bonds) need fit(frames) before use (frozen "
                               "means)")
        full = z.new_empty(z.shape[0], len(self._free))
        full[:, self._free] = z
        full[:, ~self._free] = self.frozen_values.to(z.dtype)
        return full

    def _log_volume(self, full: Tensor) -> Tensor:
        """Σ 2 log b + Σ log sin θ over all placed atoms: log|det ∂x/∂z| on the quotient."""
        b = full[:, : self.n_bonds]
        a = full[:, self.n_bonds : self.n_bonds + self.n_angles]
        return 2 * torch.log(b).sum(-1) + torch.log(torch.sin(a)).sum(-1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian ``(B, N, 3)`` nm → (``z`` ``(B, D)``, log|det ∂z/∂x| ``(B,)``)."""
        self._check_shape(x)
        full = self._all_coordinates(x)
        z = full[:, self._free] if self.has_frozen else full
        if self.has_frozen:
            full = self._expand(z)
        return z, -self._log_volume(full)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z`` ``(B, D)`` → (Cartesian ``(B, N, 3)`` nm in the canonical frame, log|det ∂x/∂z| ``(B,)``).

        Canonical frame: first root atom at the origin, second on +x, third in the xy-plane.
        """
        full = self._expand(z)
        rigid = full.new_tensor([0.0, 0.0, 0.0, 0.0, math.pi / 2, math.pi / 2]).expand(full.shape[0], 6)
        return self._place(rigid, full), self._log_volume(full)

    def forward_full(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Square variant: ``(B, N, 3)`` → ``(B, 3N)`` = [t (3), α, β, γ, z], exact log|det|."""
        if self.has_frozen:
            raise RuntimeError("forward_full is defined for the full representation (not reduced, no frozen bonds)")
        z, log_det = self.forward(x)
        r0, r1, r2 = (x[:, i] for i in self.roots)
        e = (r1 - r0) / torch.linalg.vector_norm(r1 - r0, dim=-1, keepdim=True)
        alpha = torch.atan2(e[:, 1], e[:, 0])
        beta = torch.atan2(torch.linalg.vector_norm(e[:, :2], dim=-1), e[:, 2])
        e_alpha, e_beta = _frame(alpha, beta)
        v = r2 - r1
        gamma = torch.atan2((v * e_alpha).sum(-1), (v * e_beta).sum(-1))
        rigid = torch.cat([r0, alpha[:, None], beta[:, None], gamma[:, None]], -1)
        return torch.cat([rigid, z], -1), log_det - torch.log(torch.sin(beta))

    def inverse_full(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`forward_full`."""
        rigid, z = y[:, :6], y[:, 6:]
        return self._place(rigid, z), self._log_volume(z) + torch.log(torch.sin(rigid[:, 4]))

    def _place(self, rigid: Tensor, full: Tensor) -> Tensor:
        batch = full.shape[0]
        nb, na = self.n_bonds, self.n_angles
        bonds, angles, tors = full[:, :nb], full[:, nb : nb + na], full[:, nb + na :]
        t, alpha, beta, gamma = rigid[:, :3], rigid[:, 3], rigid[:, 4], rigid[:, 5]
        e = torch.stack([torch.sin(beta) * torch.cos(alpha), torch.sin(beta) * torch.sin(alpha), torch.cos(beta)], -1)
        e_alpha, e_beta = _frame(alpha, beta)
        x = full.new_zeros(batch, self.n_atoms, 3)
        r0, r1, r2 = self.roots.tolist()
        # Second atom: bonds[0] along e from the first; third: bond/angle from the second (or first).
        x1 = t + bonds[:, :1] * e
        th = angles[:, :1]
        x2_dir = -torch.cos(th) * e + torch.sin(th) * (torch.cos(gamma)[:, None] * e_beta + torch.sin(gamma)[:, None] * e_alpha)
        # The roots form a chain r0–r1–r2 (see build_zmatrix), so the third atom hangs off the second.
        x[:, r0], x[:, r1], x[:, r2] = t, x1, x1 + bonds[:, 1:2] * x2_dir
        ti = self.torsion_idx
        for ks in self._levels:
            ks = ks.to(ti.device)
            quad = ti[ks]
            kb, ka = ks + 2, ks + 1  # torsion k ↔ bond k+2, angle k+1 (same placed atom)
            x[:, quad[:, 0]] = place_atom(
                x[:, quad[:, 1]], x[:, quad[:, 2]], x[:, quad[:, 3]], bonds[:, kb], angles[:, ka], tors[:, ks]
            )
        return x


def _mean(values: Tensor, torsion: Tensor) -> Tensor:
    """Mean over frames ``(F, K)`` → ``(K,)``; circular where ``torsion`` ``(K,)`` is set."""
    out = values.mean(0)
    out[torsion] = circular_mean(values[:, torsion])
    return out


def _main_mode(torsions: Tensor, width: float) -> Tensor:
    """Frames ``(F,)`` (bool) whose torsions ``(F, K)`` all lie within ``width`` rad of the medoid's, the
    frame with the least summed circular distance 1 − cos to all others."""
    c, s = torch.cos(torsions), torch.sin(torsions)
    spread = -(c * c.sum(0) + s * s.sum(0)).sum(-1)  # Σ_j Σ_k (1 − cos(t_ik − t_jk)) up to a constant
    medoid = torsions[torch.argmin(spread)]
    return (wrap_angle(torsions - medoid).abs() <= width).all(-1)


def _frame(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Unit vectors ∂e/∂α / |·| and ∂e/∂β of the direction e(α, β)."""
    e_alpha = torch.stack([-torch.sin(alpha), torch.cos(alpha), torch.zeros_like(alpha)], -1)
    e_beta = torch.stack([torch.cos(beta) * torch.cos(alpha), torch.cos(beta) * torch.sin(alpha), -torch.sin(beta)], -1)
    return e_alpha, e_beta
