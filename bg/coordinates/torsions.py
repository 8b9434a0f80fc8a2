"""Torsion turns: one side of a rotatable bond turned rigidly about that bond, for Monte Carlo moves.

Turning the atoms on one side of a bond a–b about the line through a and b changes the torsions about that bond
by the turn's angle and leaves every bond length, bond angle and every other torsion of the molecule as it was.
For a fixed angle the map is a bijection of frames with Jacobian determinant 1 (the moved atoms undergo a
rotation whose axis is fixed by atoms that do not move), and the turn by −δ undoes the turn by δ. So a Metropolis
move that turns a random bond by an angle drawn symmetrically about 0 needs only the energy difference
(``bg.sampling.kernels.TorsionMove``). Such moves cross torsional barriers in one step, which Langevin moves at
step sizes set by the stiffest bonds do not (alanine dipeptide's φ > 0 basins, bench/results/tarflow_stages.md).

Which bonds (``which``):
- ``backbone``: φ (N–Cα) and ψ (Cα–C) of every residue whose N is bonded to the previous residue's C (φ) or
  whose C is bonded to the next residue's N (ψ); caps (ACE, NME) count as residues.
- ``rotatable``: every bond that lies on no ring, whose two atoms each have another neighbour, and that is not
  between two atoms with three neighbours each (sp2–sp2: peptide bonds, whose cis/trans barrier no turn should
  cross) — the rule of ``bg.coordinates.harmonic.rotatable_torsions``. This includes methyl and hydroxyl rotors.

Bonds on a ring are never turned (both sides are the same component). The side with fewer atoms is turned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import mdtraj as md
import torch
from torch import Tensor

from bg.coordinates.harmonic import bond_graph

Torsions = Literal["backbone", "rotatable"]


@dataclass
class TorsionTurns:
    """The turnable bonds of a molecule.

    Attributes:
        axes: ``(R, 2)`` atom indices (a, b) of each bond; turns are right-handed about the direction a → b.
        moving: ``(R, N)`` True for the atoms each turn moves (b's side without a and b).
        names: a label per bond (e.g. ``"phi ALA2"``, ``"CB–CA"``).
    """

    axes: Tensor
    moving: Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.axes)

    def turn(self, x: Tensor, rotor: Tensor, angle: Tensor) -> Tensor:
        """Frames ``(B, N, 3)`` with bond ``rotor[i]``'s moving atoms of frame i turned by ``angle[i]`` (rad) about
        that bond (Rodrigues' formula); a new tensor in ``x``'s dtype."""
        axes, moving = self.axes.to(x.device)[rotor], self.moving.to(x.device)[rotor]  # (B, 2), (B, N)
        rows = torch.arange(len(x), device=x.device)
        origin, end = x[rows, axes[:, 0]], x[rows, axes[:, 1]]  # (B, 3)
        k = (end - origin) / (end - origin).norm(dim=-1, keepdim=True)
        v = x - origin[:, None]
        cos, sin = torch.cos(angle).to(x)[:, None, None], torch.sin(angle).to(x)[:, None, None]
        k = k[:, None].expand_as(v)
        turned = v * cos + torch.cross(k, v, dim=-1) * sin + k * (k * v).sum(-1, keepdim=True) * (1 - cos)
        return torch.where(moving[..., None], origin[:, None] + turned, x)


def _side(neighbours: list[set[int]], a: int, b: int) -> set[int]:
    """The atoms reachable from b without crossing the bond a–b (b included)."""
    seen, stack = {b}, [b]
    while stack:
        for n in neighbours[stack.pop()] - seen - {a}:
            seen.add(n)
            stack.append(n)
    return seen


def _backbone_bonds(topology: md.Topology, neighbours: list[set[int]]) -> list[tuple[int, int, str]]:
    atoms = {(atom.residue.index, atom.name): atom.index for atom in topology.atoms}
    bonds = []
    for residue in topology.residues:
        n, ca, c = (atoms.get((residue.index, name)) for name in ("N", "CA", "C"))
        if n is None or ca is None or c is None:
            continue
        previous_c = atoms.get((residue.index - 1, "C"))
        next_n = atoms.get((residue.index + 1, "N"))
        if previous_c is not None and previous_c in neighbours[n]:
            bonds.append((n, ca, f"phi {residue}"))
        if next_n is not None and next_n in neighbours[c]:
            bonds.append((ca, c, f"psi {residue}"))
    return bonds


def _rotatable_bonds(topology: md.Topology, neighbours: list[set[int]]) -> list[tuple[int, int, str]]:
    atoms = list(topology.atoms)
    bonds = []
    for a, b in sorted((min(p.index, q.index), max(p.index, q.index)) for p, q in topology.bonds):
        if len(neighbours[a]) < 2 or len(neighbours[b]) < 2:
            continue
        if len(neighbours[a]) == 3 and len(neighbours[b]) == 3:  # sp2–sp2 (peptide bond): not turned
            continue
        bonds.append((a, b, f"{atoms[a]}–{atoms[b]}"))
    return bonds


def torsion_turns(topology: md.Topology, which: Torsions = "backbone") -> TorsionTurns:
    """The turnable bonds of ``topology`` (see module docstring); raises when there are none."""
    neighbours = bond_graph(topology)
    found = _backbone_bonds(topology, neighbours) if which == "backbone" else _rotatable_bonds(topology, neighbours)
    axes, moving, names = [], [], []
    for a, b, name in found:
        side_b, side_a = _side(neighbours, a, b), _side(neighbours, b, a)
        if side_a & side_b:  # the two sides meet: the bond lies on a ring
            continue
        if len(side_a) < len(side_b):
            a, b, side_b = b, a, side_a
        mask = torch.zeros(topology.n_atoms, dtype=torch.bool)
        mask[sorted(side_b - {b})] = True
        if mask.any():
            axes.append((a, b))
            moving.append(mask)
            names.append(name)
    if not axes:
        raise ValueError(f"no {which} torsion to turn in this topology ({topology.n_residues} residues, "
                         f"{topology.n_atoms} atoms)" + ("; try torsions: rotatable" if which == "backbone" else ""))
    return TorsionTurns(torch.tensor(axes, dtype=torch.long), torch.stack(moving), names)
