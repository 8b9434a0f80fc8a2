"""A Z-matrix (placement order and reference atoms) built from a topology's bond graph.

Every atom after the first three is placed from three earlier atoms ``(p, g, d)``: bond a–p,
angle a–p–g, dihedral a–p–g–d. The choices follow chemistry so that flows see smooth, narrow
coordinates and the familiar torsions are coordinates themselves:

- the tree grows breadth-first from the backbone N, CA, C of the first amino acid, main-chain
  atoms before other heavy atoms before hydrogens, so the backbone is a path and
  φ = C(i−1)–N–CA–C, ψ = N–CA–C–N(i+1), ω = CA(i−1)–C(i−1)–N–CA are coordinates;
- the first child of an atom takes the proper torsion (d = parent of g); its later siblings
  take the dihedral relative to the first sibling (e.g. H2–C–N–H1 ≈ ±120°), which is narrow;
- the proline ring is closed through CG–CD: the N–CD bond is implied, not a coordinate. With
  ``closure_references`` the first hydrogen on CD takes its dihedral relative to N (HD2–CD–CG–N, ±120°
  in either pucker) instead of the proper HD2–CD–CG–CB, which follows the pucker; rigid rings need it
  (``InternalCoordinates``), and it stays off by default so that older checkpoints keep their coordinates.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import mdtraj as md
import numpy as np

CAP_RESIDUES = frozenset({"ACE", "NME", "NMA", "NH2", "NHE"})
BACKBONE_ATOMS = frozenset(
    {"N", "CA", "C", "O", "OXT", "OT1", "OT2", "H", "HN", "H1", "H2", "H3", "HT1", "HT2", "HT3",
     "HA", "HA2", "HA3", "HA1"}
)
MAIN_CHAIN = frozenset({"N", "CA", "C", "CH3"})
RING_CLOSURES = {"PRO": ("N", "CD"), "HYP": ("N", "CD")}


def is_backbone_atom(atom: md.core.topology.Atom) -> bool:
    """Backbone = N, CA, C, O (OXT) and their hydrogens, and every atom of a cap (ACE, NME).

    Atoms of residues that are not amino acids count as backbone too: there is no side chain to
    freeze in them.
    """
    res = atom.residue
    if res.name in CAP_RESIDUES or not res.is_protein:
        return True
    return atom.name in BACKBONE_ATOMS


@dataclass(frozen=True)
class ZMatrix:
    """Placement order and references.

    ``order``: ``(N,)`` atom indices in placement order. ``refs``: ``(N, 3)``, for the atom
    ``order[k]`` its references ``(p, g, d)`` (−1 where the k-th atom has fewer than 3: k < 3).
    ``levels``: ``(N,)`` generation of each placed atom; atoms of one level depend only on lower
    levels, so the inverse places one level at a time.
    """

    order: np.ndarray
    refs: np.ndarray
    levels: np.ndarray

    @property
    def n_atoms(self) -> int:
        return len(self.order)


def _neighbors(topology: md.Topology, closures: bool = False) -> list[list[int]]:
    """Bonded neighbours of every atom; without the RING_CLOSURES bonds unless ``closures``."""
    nbrs: list[list[int]] = [[] for _ in range(topology.n_atoms)]
    for bond in topology.bonds:
        a, b = bond.atom1, bond.atom2
        closure = RING_CLOSURES.get(a.residue.name)
        if not closures and closure and a.residue is b.residue and {a.name, b.name} == set(closure):
            continue
        nbrs[a.index].append(b.index)
        nbrs[b.index].append(a.index)
    return nbrs


def _priority(atom: md.core.topology.Atom) -> tuple[int, int]:
    if atom.element is not None and atom.element.symbol == "H":
        rank = 2
    elif atom.name in MAIN_CHAIN and (atom.residue.is_protein or atom.residue.name in CAP_RESIDUES):
        rank = 0
    else:
        rank = 1
    return rank, atom.index


def _roots(topology: md.Topology, nbrs: list[list[int]]) -> tuple[int, int, int]:
    for res in topology.residues:
        if res.is_protein and res.name not in CAP_RESIDUES:
            names = {a.name: a.index for a in res.atoms}
            if all(n in names for n in ("N", "CA", "C")):
                return names["N"], names["CA"], names["C"]
    # Not a protein: start from the first atom with two neighbours.
    atoms = list(topology.atoms)
    for a in atoms:
        if len(nbrs[a.index]) >= 2:
            n = sorted(nbrs[a.index], key=lambda i: _priority(atoms[i]))
            return n[0], a.index, n[1]
    for a in atoms:
        if nbrs[a.index] and len(nbrs[nbrs[a.index][0]]) >= 2:
            r1 = nbrs[a.index][0]
            r2 = next(i for i in nbrs[r1] if i != a.index)
            return a.index, r1, r2
    raise ValueError("internal coordinates need at least three bonded atoms in a chain")


def build_zmatrix(topology: md.Topology, closure_references: bool = False) -> ZMatrix:
    """Build the Z-matrix of a single connected molecule from its bonds.

    ``closure_references``: sibling references may be RING_CLOSURES partners (see the module docstring).

    Raises ``ValueError`` with the fix when the topology has no bonds or several molecules.
    """
    n = topology.n_atoms
    if n < 3:
        raise ValueError(f"internal coordinates need at least 3 atoms, the topology has {n}")
    if topology.n_bonds == 0:
        raise ValueError(
            "the topology has no bonds; load it from a PDB with CONECT records or standard residue "
            "names (mdtraj/OpenMM add standard bonds), or call topology.create_standard_bonds()"
        )
    nbrs = _neighbors(topology)
    bonded = _neighbors(topology, closures=True) if closure_references else nbrs
    atoms = list(topology.atoms)
    r0, r1, r2 = _roots(topology, nbrs)

    parent = np.full(n, -1)
    parent[r1], parent[r2] = r0, r1  # _roots returns a bonded chain r0–r1–r2
    order = [r0, r1, r2]
    seen = {r0, r1, r2}
    queue = deque(order)
    while queue:
        a = queue.popleft()
        for c in sorted(nbrs[a], key=lambda i: _priority(atoms[i])):
            if c not in seen:
                seen.add(c)
                parent[c] = a
                order.append(c)
                queue.append(c)
    if len(order) != n:
        missing = [str(atoms[i]) for i in range(n) if i not in seen][:5]
        raise ValueError(
            f"the topology is not one connected molecule ({n - len(order)} atoms not bonded to the "
            f"rest, e.g. {', '.join(missing)}); strip waters/ions or pass one chain"
        )

    rank = np.empty(n, dtype=int)
    rank[np.asarray(order)] = np.arange(n)
    refs = np.full((n, 3), -1)
    levels = np.zeros(n, dtype=int)
    refs[1, 0] = r0
    refs[2, :2] = (r1, r0)
    levels[1], levels[2] = 1, 2
    level_of = {r0: 0, r1: 1, r2: 2}
    for k in range(3, n):
        a = order[k]
        p = parent[a]
        g = parent[p] if p != r0 else r1
        placed_before = lambda i: rank[i] < k  # noqa: E731
        siblings = sorted((i for i in bonded[p] if i not in (g, a) and placed_before(i)), key=rank.__getitem__)
        if siblings:
            d = siblings[0]
        else:
            cands = sorted((i for i in nbrs[g] if i != p and placed_before(i)), key=rank.__getitem__)
            if g != r0 and parent[g] >= 0 and parent[g] != p:
                d = parent[g]
            elif cands:
                d = cands[0]
            else:  # a three-atom star around the root: any other placed atom does
                d = next(i for i in order[:k] if i not in (p, g))
        refs[k] = (p, g, d)
        level_of[a] = 1 + max(level_of[p], level_of[g], level_of[d])
        levels[k] = level_of[a]
    return ZMatrix(order=np.asarray(order), refs=refs, levels=levels)


def small_rings(topology: md.Topology, zmatrix: ZMatrix, max_size: int = 8) -> list[frozenset[int]]:
    """Ring systems of at most ``max_size`` atoms per ring inside one residue, as atom index sets.

    Every bond of the topology that the Z-matrix tree does not contain closes one ring: the tree path
    between its atoms plus the bond. Rings that share a bond (Trp's indole) merge into one system.
    Rings through several residues (disulfides, cyclic peptides) are not returned: freezing them would
    freeze the backbone between.
    """
    parent = {int(a): int(r[0]) for a, r in zip(zmatrix.order, zmatrix.refs) if r[0] >= 0}
    atoms = list(topology.atoms)

    def path_to_root(i: int) -> list[int]:
        path = [i]
        while path[-1] in parent:
            path.append(parent[path[-1]])
        return path

    rings: list[set[int]] = []
    for bond in topology.bonds:
        u, v = bond.atom1.index, bond.atom2.index
        if parent.get(u) == v or parent.get(v) == u or atoms[u].residue is not atoms[v].residue:
            continue
        pu, pv = path_to_root(u), path_to_root(v)
        common = set(pu) & set(pv)
        ring = set(pu[: next(k for k, a in enumerate(pu) if a in common) + 1])
        ring |= set(pv[: next(k for k, a in enumerate(pv) if a in common) + 1])
        if len(ring) <= max_size and len({atoms[i].residue.index for i in ring}) == 1:
            rings.append(ring)
    merged: list[set[int]] = []
    for ring in rings:
        for other in [m for m in merged if len(m & ring) >= 2]:
            merged.remove(other)
            ring = ring | other
        merged.append(ring)
    return [frozenset(r) for r in merged]
