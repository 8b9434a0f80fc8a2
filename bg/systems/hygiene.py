"""Checks of generated frames against the molecule: chirality and bond graph.

A generator that is equivariant to reflections (an EGNN flow) gives a frame and its mirror image the
same density, so half its samples of an L-peptide are D-peptides; one that permutes identical atoms
can also move a hydrogen to the wrong heavy atom. Both have the energy of a valid molecule of another
kind, so importance weights do not remove them; they must be found and fixed or dropped, and their
rates reported (an ESS over the survivors alone flatters the generator).

- Chiral centres: carbons with four bonded neighbours of which at most one is a hydrogen (Cα of every
  residue but glycine, Cβ of Ile and Thr). The chirality of a centre is the sign of the triple product
  (a − c)·((b − c) × (d − c)) over its first three neighbours in topology order; the reference frame
  gives the expected signs.
- Bond graph: atoms i, j are bonded when |x_i − x_j| < ``tolerance`` · (r_i + r_j) with covalent radii
  r (Cordero et al. 2008); a frame's graph must equal the topology's bonds.
"""

from __future__ import annotations

from typing import Literal

import mdtraj as md
import numpy as np
import torch
from torch import Tensor

from bg.choices import check_choices

#: Covalent radii in nm (Cordero et al., Dalton Trans. 2008) of the elements of biomolecules.
COVALENT_RADII = {"H": 0.031, "C": 0.076, "N": 0.071, "O": 0.066, "S": 0.105, "P": 0.107, "F": 0.057,
                  "Cl": 0.102, "Br": 0.120, "I": 0.139, "Se": 0.120, "Na": 0.166, "K": 0.203, "Mg": 0.141,
                  "Ca": 0.176, "Zn": 0.122, "Fe": 0.132}

ChiralityMode = Literal["mirror", "drop", "keep"]


def chiral_centres(topology: md.Topology) -> Tensor:
    """``(C, 4)`` atom indices: each chiral centre followed by its first three bonded neighbours."""
    neighbours: dict[int, list[int]] = {a.index: [] for a in topology.atoms}
    for a, b in topology.bonds:
        neighbours[a.index].append(b.index)
        neighbours[b.index].append(a.index)
    atoms = list(topology.atoms)
    rows = []
    for atom in atoms:
        nb = sorted(neighbours[atom.index])
        if atom.element is None or atom.element.symbol != "C" or len(nb) != 4:
            continue
        if sum(atoms[k].element is not None and atoms[k].element.symbol == "H" for k in nb) <= 1:
            rows.append([atom.index, *nb[:3]])
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)


def chirality_signs(x: Tensor, centres: Tensor) -> Tensor:
    """Signs ±1 ``(B, C)`` of the triple products at ``centres`` for frames ``(B, N, 3)``."""
    c, a, b, d = (x[:, centres[:, k]] for k in range(4))
    return torch.sign(((a - c) * torch.cross(b - c, d - c, dim=-1)).sum(-1))


def _bond_matrix(topology: md.Topology) -> np.ndarray:
    n = topology.n_atoms
    m = np.zeros((n, n), dtype=bool)
    for a, b in topology.bonds:
        m[a.index, b.index] = m[b.index, a.index] = True
    return m


class FrameChecks:
    """Chirality and bond-graph checks of frames of one molecule (see module docstring).

    Args:
        topology: the molecule (its bonds are the expected graph).
        reference: a valid frame ``(N, 3)`` nm that sets the expected chirality of every centre.
        tolerance: bond cut-off as a multiple of the sum of covalent radii.
    """

    def __init__(self, topology: md.Topology, reference: Tensor | np.ndarray, tolerance: float = 1.3):
        self.centres = chiral_centres(topology)
        ref = torch.as_tensor(np.asarray(reference), dtype=torch.float64).reshape(1, -1, 3)
        self.expected = chirality_signs(ref, self.centres)[0]
        symbols = [a.element.symbol if a.element is not None else "?" for a in topology.atoms]
        missing = sorted({s for s in symbols if s not in COVALENT_RADII})
        if missing:
            raise ValueError(f"no covalent radius for element(s) {', '.join(missing)}; add them to "
                             "bg.systems.hygiene.COVALENT_RADII")
        r = torch.tensor([COVALENT_RADII[s] for s in symbols], dtype=torch.float64)
        self.cutoff = tolerance * (r[:, None] + r[None, :])
        self.bonds = torch.as_tensor(_bond_matrix(topology))
        if (torch.cdist(ref[0], ref[0]) < self.cutoff).fill_diagonal_(False).ne(self.bonds).any():
            raise ValueError("the reference frame's bond graph (distance cut-off) differs from the topology's bonds; "
                             "check the reference positions or the tolerance")

    def inverted(self, x: Tensor) -> Tensor:
        """``(B, C)`` bool: centres whose chirality is the mirror image of the reference."""
        return chirality_signs(x.double(), self.centres.to(x.device)) != self.expected.to(x.device)

    def broken_topology(self, x: Tensor) -> Tensor:
        """``(B,)`` bool: frames whose distance-inferred bond graph differs from the topology."""
        x = x.double()
        d = (x.unsqueeze(-2) - x.unsqueeze(-3)).square().sum(-1).sqrt()
        graph = d < self.cutoff.to(x.device)
        graph = graph & ~torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
        return graph.ne(self.bonds.to(x.device)).any(-1).any(-1)

    def apply(self, x: Tensor, chirality: ChiralityMode = "mirror", drop_broken: bool = True) -> dict[str, Tensor]:
        """Check frames ``(B, N, 3)`` and fix their chirality.

        ``chirality``: ``mirror`` (frames with every centre inverted are reflected through their
        centroid, x → 2·c − x; frames with mixed chirality are dropped), ``drop`` (every frame with an
        inverted centre is dropped) or ``keep``. Frames with a broken bond graph are marked, and dropped
        when ``drop_broken``.

        Returns ``x`` (fixed frames), ``wrong_chirality`` (any centre inverted, before fixing),
        ``mirrored``, ``broken_topology`` and ``valid`` (``(B,)`` bool; not dropped).
        """
        check_choices(FrameChecks.apply, dict(chirality=chirality))
        inv = self.inverted(x)
        wrong = inv.any(-1)
        mirrored = torch.zeros_like(wrong)
        valid = torch.ones_like(wrong)
        if chirality == "mirror" and inv.shape[-1] > 0:
            mirrored = inv.all(-1)
            c = x.mean(-2, keepdim=True)
            x = torch.where(mirrored[:, None, None], 2 * c - x, x)
            valid = valid & ~(wrong & ~mirrored)
        elif chirality == "drop":
            valid = valid & ~wrong
        broken = self.broken_topology(x)
        if drop_broken:
            valid = valid & ~broken
        return dict(x=x, wrong_chirality=wrong, mirrored=mirrored, broken_topology=broken, valid=valid)
