"""Structural observables of generated and MD frames: backbone distances, φ/ψ, Ramachandran basins,
residue contact maps.

All take frames ``(B, N, 3)`` in nm as torch tensors and an mdtraj topology; angles in radians
[−π, π), mdtraj's sign convention.
"""

from __future__ import annotations

import math
from typing import Literal

import mdtraj as md
import numpy as np
import torch
from torch import Tensor

from bg.coordinates.geometry import dihedrals

#: Heavy backbone atoms whose pairwise distances define the distance-matrix losses and ΔD.
BACKBONE_HEAVY = frozenset({"N", "CA", "C", "O", "OXT", "CH3"})

#: φ/ψ basins of alanine-like residues (degrees; φ < 0 half split by ψ, φ ≥ 0 half by ψ's sign).
#: β/C7eq: φ < 0, ψ ∉ [−120, 50); αR: φ < 0, ψ ∈ [−120, 50); αL: φ ≥ 0, ψ ≥ 0; C7ax: φ ≥ 0, ψ < 0.
BASINS = ("beta_C7eq", "alpha_R", "alpha_L", "C7ax")


def backbone_atoms(topology: md.Topology) -> np.ndarray:
    """Indices of the heavy backbone atoms (N, CA, C, O, OXT and the caps' CH3) in topology order."""
    idx = [a.index for a in topology.atoms if a.name in BACKBONE_HEAVY and a.element.symbol != "H"]
    if len(idx) < 2:
        raise ValueError("the topology has fewer than two heavy backbone atoms (N, CA, C, O); is it a protein?")
    return np.asarray(idx)


#: Atoms whose distance matrix a loss matches: ``backbone`` the heavy backbone atoms (Kim et al.); ``polar`` those
#: and every side-chain N, O and S (hydrogen-bond donors and acceptors, charged groups: where salt bridges and
#: hydrogen bonds show); ``heavy`` every atom but hydrogen (side-chain packing too).
DistanceAtoms = Literal["backbone", "polar", "heavy"]


def distance_atoms(topology: md.Topology, atoms: DistanceAtoms = "backbone") -> np.ndarray:
    """Indices of the ``atoms`` selection (see :data:`DistanceAtoms`) in topology order."""
    if atoms == "backbone":
        return backbone_atoms(topology)
    backbone = set(backbone_atoms(topology).tolist())
    elements = {"polar": {"N", "O", "S"}, "heavy": None}[atoms]
    return np.asarray([a.index for a in topology.atoms if a.element.symbol != "H"
                       and (a.index in backbone or elements is None or a.element.symbol in elements)])


def distance_pairs(topology: md.Topology, atoms: DistanceAtoms = "backbone") -> Tensor:
    """All atom pairs ``(P, 2)`` (i < j) of the ``atoms`` selection (see :data:`DistanceAtoms`)."""
    idx = distance_atoms(topology, atoms)
    i, j = np.triu_indices(len(idx), k=1)
    return torch.as_tensor(np.stack([idx[i], idx[j]], 1), dtype=torch.long)


def backbone_pairs(topology: md.Topology) -> Tensor:
    """All atom pairs ``(P, 2)`` (i < j) of heavy backbone atoms: the backbone distance matrix."""
    return distance_pairs(topology, "backbone")


def phi_psi_atoms(topology: md.Topology) -> tuple[Tensor, Tensor]:
    """Atom quadruples ``(R, 4)`` of every φ and ``(R, 4)`` ψ torsion, paired per residue
    (residues that have both; for a capped peptide every amino acid)."""
    traj = md.Trajectory(np.zeros((1, topology.n_atoms, 3), dtype=np.float32), topology)
    phi, psi = md.compute_phi(traj)[0], md.compute_psi(traj)[0]
    by_res_phi = {topology.atom(int(q[1])).residue.index: q for q in phi}
    by_res_psi = {topology.atom(int(q[1])).residue.index: q for q in psi}
    common = sorted(set(by_res_phi) & set(by_res_psi))
    if not common:
        raise ValueError("no residue has both a φ and a ψ torsion (need N, CA, C and both neighbours)")
    return (torch.as_tensor(np.stack([by_res_phi[r] for r in common]), dtype=torch.long),
            torch.as_tensor(np.stack([by_res_psi[r] for r in common]), dtype=torch.long))


def torsions(x: Tensor, quads: Tensor) -> Tensor:
    """Dihedral angles ``(B, R)`` of atom quadruples ``(R, 4)``."""
    return dihedrals(x[:, quads[:, 0]], x[:, quads[:, 1]], x[:, quads[:, 2]], x[:, quads[:, 3]])


def phi_psi(x: Tensor, topology: md.Topology) -> tuple[Tensor, Tensor]:
    """φ ``(B, R)`` and ψ ``(B, R)`` per residue (see :func:`phi_psi_atoms`)."""
    phi_q, psi_q = phi_psi_atoms(topology)
    return torsions(x, phi_q.to(x.device)), torsions(x, psi_q.to(x.device))


def basin_index(phi: Tensor, psi: Tensor) -> Tensor:
    """Basin of each (φ, ψ) as an index into :data:`BASINS`."""
    lo, hi = math.radians(-120), math.radians(50)
    neg = phi < 0
    alpha_r = neg & (psi >= lo) & (psi < hi)
    out = torch.zeros_like(phi, dtype=torch.long)
    out[alpha_r] = 1
    out[~neg & (psi >= 0)] = 2
    out[~neg & (psi < 0)] = 3
    return out


def basin_populations(phi: Tensor, psi: Tensor, log_w: Tensor | None = None) -> dict[str, float]:
    """Population of each basin for one residue's φ, ψ ``(B,)``, weighted if ``log_w`` ``(B,)`` is
    given (self-normalised importance weights; non-finite weights count as zero)."""
    idx = basin_index(phi, psi)
    if log_w is None:
        w = torch.ones_like(phi, dtype=torch.float64)
    else:
        lw = torch.where(torch.isfinite(log_w), log_w.double(), torch.full_like(log_w, -math.inf, dtype=torch.float64))
        w = torch.softmax(lw, 0)
    w = w / w.sum()
    return {name: float(w[idx == k].sum()) for k, name in enumerate(BASINS)}


#: Cα–Cα distance (nm) below which two residues count as in contact in :func:`contact_map`.
CONTACT_CUTOFF = 0.8


def alpha_carbons(topology: md.Topology) -> np.ndarray:
    """Index of each residue's CA atom in topology order (residues without one, e.g. caps, are left out)."""
    return np.asarray([a.index for a in topology.atoms if a.name == "CA"], dtype=int)


def contact_map(x: Tensor, topology: md.Topology, log_w: Tensor | None = None,
                cutoff: float = CONTACT_CUTOFF) -> Tensor:
    """Residue contact probabilities ``(R, R)``: the (self-normalised, with ``log_w`` ``(B,)``) weighted
    fraction of frames ``(B, N, 3)`` nm whose Cα–Cα distance is below ``cutoff`` nm, over the ``R``
    residues with a CA atom. Frames with non-finite positions count as weight 0."""
    ca = torch.as_tensor(alpha_carbons(topology), device=x.device)
    pos = x[:, ca].double()
    ok = torch.isfinite(pos).flatten(1).all(1)
    lw = torch.zeros(len(x), dtype=torch.float64, device=x.device) if log_w is None else log_w.double().to(x.device)
    lw = torch.where(ok & torch.isfinite(lw), lw, torch.full_like(lw, -math.inf))
    out = torch.zeros(len(ca), len(ca), dtype=torch.float64, device=x.device)
    if not torch.isfinite(lw).any():
        return out.fill_(math.nan)
    w = torch.softmax(lw, 0)
    for chunk, wc in zip(pos.split(1024), w.split(1024)):
        keep = wc > 0
        d = torch.cdist(chunk[keep], chunk[keep])
        out += torch.einsum("b,bij->ij", wc[keep], (d < cutoff).double())
    return out
