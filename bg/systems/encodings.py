"""Atom encodings: integer tokens per atom that an equivariant network embeds as node features.

Three encodings (Klein & Noé, "Transferable Boltzmann Generators", 2024):

- ``element``: the atomic number.
- ``backbone``: the atomic number plus the backbone atom name (N, CA, C, O, H, HA; 0 for other atoms).
- ``full``: residue type, atom name and residue index ("TBG + full"; generalises across peptides).
  A hydrogen is named after the heavy atom it is bonded to (``H@CB``), so the hydrogens of one
  methyl or methylene group get the same token whatever their PDB names: they are identical atoms,
  and an equivariant network treats them as permutable.

Vocabularies are global (fixed lists below, not built from the molecule), so a network trained on
one peptide accepts another. Atoms with a name or residue outside the lists get token 0 ("unknown").

``atom_tokens(topology, kind)`` returns a LongTensor ``(N, C)``; ``ENCODING_VOCAB[kind]`` the vocabulary
size of each of the C columns. Atoms with identical rows are "identical atoms".
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import mdtraj as md
import torch
from torch import Tensor

from bg.choices import check_choices

log = logging.getLogger(__name__)

Encoding = Literal["element", "backbone", "full"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)

#: Backbone atom names of the ``backbone`` encoding (token = position + 1).
BACKBONE_NAMES = ("N", "CA", "C", "O", "H", "HA")

#: Residue types of the ``full`` encoding (token = position + 1); protonation variants map to their residue.
RESIDUES = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET", "PHE",
            "PRO", "SER", "THR", "TRP", "TYR", "VAL", "ACE", "NME", "NH2")
RESIDUE_ALIASES = {"HID": "HIS", "HIE": "HIS", "HIP": "HIS", "HSD": "HIS", "HSE": "HIS", "HSP": "HIS",
                   "CYX": "CYS", "CYM": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS"}

#: PDB heavy-atom names of the standard amino acids and caps (token = position + 1; a hydrogen gets
#: the token of its heavy atom + len(HEAVY_NAMES) + 1).
HEAVY_NAMES = ("N", "CA", "C", "O", "OXT", "CB", "CG", "CG1", "CG2", "OG", "OG1", "SG", "CD", "CD1", "CD2", "ND1",
               "ND2", "OD1", "OD2", "SD", "CE", "CE1", "CE2", "CE3", "NE", "NE1", "NE2", "OE1", "OE2", "CZ", "CZ2",
               "CZ3", "NZ", "OH", "NH1", "NH2", "CH2", "CH3")

#: Largest residue index the ``full`` encoding embeds.
MAX_RESIDUES = 64

ENCODING_VOCAB: dict[str, tuple[int, ...]] = {
    "element": (119,),
    "backbone": (119, len(BACKBONE_NAMES) + 1),
    "full": (len(RESIDUES) + 1, 2 * (len(HEAVY_NAMES) + 1), MAX_RESIDUES),
}


def atom_tokens(topology: md.Topology, kind: Encoding = "full") -> Tensor:
    """Integer tokens ``(N, C)`` of every atom of ``topology`` for encoding ``kind`` (see module docstring)."""
    check_choices(atom_tokens, dict(kind=kind), "atom encoding ")
    unknown: set[str] = set()
    rows = []
    partners = {}
    if kind == "full":
        for a, b in topology.bonds:
            if a.element.symbol == "H" and b.element.symbol != "H":
                partners[a.index] = b
            elif b.element.symbol == "H" and a.element.symbol != "H":
                partners[b.index] = a
    first_residue = next(iter(topology.residues)).index
    for atom in topology.atoms:
        z = atom.element.atomic_number if atom.element is not None else 0
        if kind == "element":
            rows.append((z,))
            continue
        if kind == "backbone":
            rows.append((z, BACKBONE_NAMES.index(atom.name) + 1 if atom.name in BACKBONE_NAMES else 0))
            continue
        res = RESIDUE_ALIASES.get(atom.residue.name, atom.residue.name)
        res_token = RESIDUES.index(res) + 1 if res in RESIDUES else 0
        if res_token == 0:
            unknown.add(f"residue {atom.residue.name}")
        heavy = partners.get(atom.index) if atom.element is not None and atom.element.symbol == "H" else atom
        if heavy is None:  # a hydrogen without a bonded heavy atom (H2, a broken topology)
            name_token = 0
            unknown.add(f"unbonded hydrogen {atom}")
        elif heavy.name in HEAVY_NAMES:
            name_token = HEAVY_NAMES.index(heavy.name) + 1 + (len(HEAVY_NAMES) + 1) * (heavy is not atom)
        else:
            name_token = 0
            unknown.add(f"atom name {heavy.residue.name}:{heavy.name}")
        index = atom.residue.index - first_residue
        if index >= MAX_RESIDUES:
            raise ValueError(f"the 'full' atom encoding embeds at most {MAX_RESIDUES} residues; this topology has "
                             f"{topology.n_residues}. Use model.encoding: backbone or element")
        rows.append((res_token, name_token, index))
    if unknown:
        log.warning("atom encoding %r: %s get the 'unknown' token", kind, ", ".join(sorted(unknown)))
    return torch.tensor(rows, dtype=torch.long)


def identical_atom_groups(tokens: Tensor) -> list[Tensor]:
    """Groups of ≥ 2 atoms with identical token rows (indices, ascending), from ``atom_tokens`` ``(N, C)``."""
    _, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    groups = [torch.nonzero(inverse == k).flatten() for k in range(int(inverse.max()) + 1)]
    return [g for g in groups if len(g) > 1]
