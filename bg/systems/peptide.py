"""Capped peptides (ACE-…-NME) from a one-letter sequence.

Heavy atoms are placed from ideal internal geometry (bond lengths in nm, angles and torsions in
degrees; backbone in a polyproline-II conformation φ = −65°, ψ = 140°, side chains in common
rotamers with L-chirality and the IUPAC branch order of THR/ILE/VAL/LEU), hydrogens are added by
OpenMM's ``Modeller`` at pH 7, and the structure is energy-minimised in the chosen force field.
"""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import openmm
from openmm import app, unit

from bg.systems.system import MolecularSystem, resolve_forcefield

ONE_TO_THREE = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU", "G": "GLY",
    "H": "HIS", "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE", "P": "PRO", "S": "SER",
    "T": "THR", "W": "TRP", "Y": "TYR", "V": "VAL",
}

# Backbone (nm, degrees).
_B_N_CA, _B_CA_C, _B_C_N, _B_C_O, _B_CA_CB = 0.1458, 0.1525, 0.1329, 0.1231, 0.1530
_A_N_CA_C, _A_CA_C_N, _A_C_N_CA, _A_CA_C_O, _A_CB_CA_C = 111.2, 116.2, 121.7, 120.5, 110.1
_T_N_C_CA_CB = 122.5  # dihedral CB–CA–C–N for L-amino acids
_PHI, _PSI, _OMEGA = -65.0, 140.0, 180.0

_PHE_RING = [
    ("CG", "CB", "CA", "N", 0.150, 114.0, -60.0),
    ("CD1", "CG", "CB", "CA", 0.139, 121.0, 90.0),
    ("CD2", "CG", "CB", "CA", 0.139, 121.0, -90.0),
    ("CE1", "CD1", "CG", "CB", 0.139, 120.0, 180.0),
    ("CE2", "CD2", "CG", "CB", 0.139, 120.0, 180.0),
    ("CZ", "CE1", "CD1", "CG", 0.139, 120.0, 0.0),
]

#: Side-chain heavy atoms: (atom, p, g, d, bond nm, angle a–p–g deg, dihedral a–p–g–d deg).
SIDE_CHAINS: dict[str, list[tuple]] = {
    "GLY": [],
    "ALA": [],
    "SER": [("OG", "CB", "CA", "N", 0.142, 111.0, -60.0)],
    "CYS": [("SG", "CB", "CA", "N", 0.181, 114.0, -60.0)],
    "VAL": [("CG1", "CB", "CA", "N", 0.152, 110.5, 180.0), ("CG2", "CB", "CA", "N", 0.152, 110.5, -60.0)],
    "THR": [("OG1", "CB", "CA", "N", 0.143, 109.5, -60.0), ("CG2", "CB", "CA", "N", 0.152, 111.0, 180.0)],
    "ILE": [("CG1", "CB", "CA", "N", 0.153, 110.0, -60.0), ("CG2", "CB", "CA", "N", 0.153, 110.5, 180.0),
            ("CD1", "CG1", "CB", "CA", 0.152, 114.0, 180.0)],
    "LEU": [("CG", "CB", "CA", "N", 0.153, 116.0, -60.0), ("CD1", "CG", "CB", "CA", 0.152, 111.0, 180.0),
            ("CD2", "CG", "CB", "CA", 0.152, 111.0, -60.0)],
    "MET": [("CG", "CB", "CA", "N", 0.152, 114.0, -60.0), ("SD", "CG", "CB", "CA", 0.181, 113.0, 180.0),
            ("CE", "SD", "CG", "CB", 0.179, 100.0, 180.0)],
    "PRO": [("CG", "CB", "CA", "N", 0.150, 104.5, 30.0), ("CD", "CG", "CB", "CA", 0.151, 105.5, -35.0)],
    "ASP": [("CG", "CB", "CA", "N", 0.152, 113.0, -60.0), ("OD1", "CG", "CB", "CA", 0.125, 119.0, -60.0),
            ("OD2", "CG", "CB", "CA", 0.125, 119.0, 120.0)],
    "ASN": [("CG", "CB", "CA", "N", 0.152, 113.0, -60.0), ("OD1", "CG", "CB", "CA", 0.123, 121.0, -60.0),
            ("ND2", "CG", "CB", "CA", 0.133, 116.0, 120.0)],
    "GLU": [("CG", "CB", "CA", "N", 0.152, 114.0, -60.0), ("CD", "CG", "CB", "CA", 0.152, 113.0, 180.0),
            ("OE1", "CD", "CG", "CB", 0.125, 119.0, -60.0), ("OE2", "CD", "CG", "CB", 0.125, 119.0, 120.0)],
    "GLN": [("CG", "CB", "CA", "N", 0.152, 114.0, -60.0), ("CD", "CG", "CB", "CA", 0.152, 113.0, 180.0),
            ("OE1", "CD", "CG", "CB", 0.123, 121.0, -60.0), ("NE2", "CD", "CG", "CB", 0.133, 116.0, 120.0)],
    "LYS": [("CG", "CB", "CA", "N", 0.152, 114.0, -60.0), ("CD", "CG", "CB", "CA", 0.152, 111.0, 180.0),
            ("CE", "CD", "CG", "CB", 0.152, 111.0, 180.0), ("NZ", "CE", "CD", "CG", 0.149, 111.0, 180.0)],
    "ARG": [("CG", "CB", "CA", "N", 0.152, 114.0, -60.0), ("CD", "CG", "CB", "CA", 0.152, 111.0, 180.0),
            ("NE", "CD", "CG", "CB", 0.146, 112.0, 180.0), ("CZ", "NE", "CD", "CG", 0.133, 124.0, 180.0),
            ("NH1", "CZ", "NE", "CD", 0.133, 120.0, 0.0), ("NH2", "CZ", "NE", "CD", 0.133, 120.0, 180.0)],
    "HIS": [("CG", "CB", "CA", "N", 0.150, 114.0, -60.0), ("ND1", "CG", "CB", "CA", 0.138, 122.0, -90.0),
            ("CD2", "CG", "CB", "CA", 0.136, 131.0, 90.0), ("CE1", "ND1", "CG", "CB", 0.132, 108.0, 180.0),
            ("NE2", "CD2", "CG", "CB", 0.137, 107.0, 180.0)],
    "PHE": _PHE_RING,
    "TYR": _PHE_RING + [("OH", "CZ", "CE1", "CD1", 0.136, 120.0, 180.0)],
    "TRP": [("CG", "CB", "CA", "N", 0.150, 114.0, -60.0), ("CD1", "CG", "CB", "CA", 0.137, 127.0, 90.0),
            ("CD2", "CG", "CB", "CA", 0.143, 126.5, -90.0), ("NE1", "CD1", "CG", "CB", 0.138, 110.0, 180.0),
            ("CE2", "CD2", "CG", "CB", 0.141, 107.0, 180.0), ("CE3", "CD2", "CG", "CB", 0.140, 134.0, 0.0),
            ("CZ2", "CE2", "CD2", "CG", 0.140, 122.0, 180.0), ("CZ3", "CE3", "CD2", "CG", 0.139, 119.0, 180.0),
            ("CH2", "CZ2", "CE2", "CD2", 0.137, 118.0, 0.0)],
}

_ELEMENTS = {"C": "carbon", "N": "nitrogen", "O": "oxygen", "S": "sulfur"}


def _place(p: np.ndarray, g: np.ndarray, d: np.ndarray, bond: float, angle: float, torsion: float) -> np.ndarray:
    """NeRF in numpy, same convention as ``bg.coordinates.geometry.place_atom`` (degrees in)."""
    u = p - g
    u /= np.linalg.norm(u)
    w = d - g
    w -= w.dot(u) * u
    w /= np.linalg.norm(w)
    n = np.cross(u, w)
    a, t = math.radians(angle), math.radians(torsion)
    return p + bond * (-math.cos(a) * u + math.sin(a) * (math.cos(t) * w + math.sin(t) * n))


def heavy_atom_peptide(sequence: str) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """Residues ``[(name, [(atom, xyz nm), ...]), ...]`` of ACE-<sequence>-NME, heavy atoms only."""
    seq = sequence.strip().upper()
    if not seq:
        raise ValueError("empty peptide sequence")
    bad = sorted({c for c in seq if c not in ONE_TO_THREE})
    if bad:
        raise ValueError(f"unknown one-letter residue code(s) {bad} in {sequence!r}; use the 20 standard amino acids")
    # Backbone chain CH3(ACE) C(ACE) [N CA C]* N(NME) C(NME); torsion of each new atom from the previous three.
    chain = [np.zeros(3), np.array([0.152, 0.0, 0.0])]
    ang = math.radians(180.0 - _A_CA_C_N)
    chain.append(chain[1] + _B_C_N * np.array([math.cos(ang), math.sin(ang), 0.0]))
    for _ in seq:
        chain.append(_place(chain[-1], chain[-2], chain[-3], _B_N_CA, _A_C_N_CA, _OMEGA))
        chain.append(_place(chain[-1], chain[-2], chain[-3], _B_CA_C, _A_N_CA_C, _PHI))
        chain.append(_place(chain[-1], chain[-2], chain[-3], _B_C_N, _A_CA_C_N, _PSI))
    chain.append(_place(chain[-1], chain[-2], chain[-3], _B_N_CA, _A_C_N_CA, _OMEGA))

    residues = []
    o_ace = _place(chain[1], chain[0], chain[2], _B_C_O, _A_CA_C_O, 180.0)
    residues.append(("ACE", [("CH3", chain[0]), ("C", chain[1]), ("O", o_ace)]))
    for i, code in enumerate(seq):
        n, ca, c, n_next = chain[2 + 3 * i : 6 + 3 * i]
        name = ONE_TO_THREE[code]
        atoms = {"N": n, "CA": ca, "C": c, "O": _place(c, ca, n_next, _B_C_O, _A_CA_C_O, 180.0)}
        if name != "GLY":
            atoms["CB"] = _place(ca, c, n, _B_CA_CB, _A_CB_CA_C, _T_N_C_CA_CB)
        for atom, p, g, d, b, a, t in SIDE_CHAINS[name]:
            atoms[atom] = _place(atoms[p], atoms[g], atoms[d], b, a, t)
        residues.append((name, list(atoms.items())))
    residues.append(("NME", [("N", chain[-2]), ("C", chain[-1])]))
    return residues


def build_capped_peptide(
    sequence: str,
    forcefield: str | tuple[str, ...] = "amber14-obc2",
    temperature: float = 300.0,
    name: str | None = None,
    minimize: bool = True,
    constraints: str | None = None,
) -> MolecularSystem:
    """ACE-<sequence>-NME with hydrogens, energy-minimised in ``forcefield``.

    Args:
        sequence: one-letter codes of the 20 standard amino acids, e.g. ``"A"`` for alanine dipeptide.
        forcefield: preset name or OpenMM XML files (see ``bg.systems.FORCEFIELDS``).
        temperature: K.
        name: defaults to ``"ace-<seq>-nme"``.
        minimize: run OpenMM's local energy minimiser (tolerance 10 kJ/mol/nm).
    """
    files = resolve_forcefield(forcefield)
    residues = heavy_atom_peptide(sequence)
    top = app.Topology()
    chain = top.addChain("A")
    positions = []
    for i, (rname, atoms) in enumerate(residues, start=1):
        res = top.addResidue(rname, chain, id=str(i))
        for aname, xyz in atoms:
            top.addAtom(aname, app.Element.getBySymbol(aname[0]), res)
            positions.append(xyz)
    top.createStandardBonds()
    ff = app.ForceField(*files)
    modeller = app.Modeller(top, np.asarray(positions) * unit.nanometer)
    add_hydrogens(modeller, ff)
    system = MolecularSystem(
        name=name or f"ace-{sequence.lower()}-nme",
        omm_topology=modeller.topology,
        positions=modeller.positions.value_in_unit(unit.nanometer),
        forcefield=files,
        temperature=temperature,
        constraints=constraints,
        metadata={"sequence": sequence.upper(), "source": "bg.systems.build_capped_peptide"},
    )
    if minimize:
        system.positions = minimize_positions(system)
    return system


@contextlib.contextmanager
def _seeded_python_random(seed: int):
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def add_hydrogens(modeller: app.Modeller, forcefield: app.ForceField, seed: int = 2024) -> None:
    """``Modeller.addHydrogens`` at pH 7, made reproducible.

    OpenMM starts added hydrogens from random positions (Python's ``random``) and relaxes them on
    the default (multithreaded) platform; seeding and the Reference platform make the same input
    give the same structure, so cached data and resumed runs stay valid.
    """
    with _seeded_python_random(seed):
        modeller.addHydrogens(forcefield, pH=7.0, platform=openmm.Platform.getPlatformByName("Reference"))


def minimize_positions(system: MolecularSystem, tolerance: float = 10.0, max_iterations: int = 0) -> np.ndarray:
    """Local energy minimisation (OpenMM L-BFGS); returns positions ``(N, 3)`` nm, float64."""
    omm_system = system.create_openmm_system()
    integrator = openmm.VerletIntegrator(0.001)
    platform = openmm.Platform.getPlatformByName("Reference" if system.n_atoms < 200 else "CPU")
    context = openmm.Context(omm_system, integrator, platform)
    context.setPositions(system.positions * unit.nanometer)
    openmm.LocalEnergyMinimizer.minimize(context, tolerance * unit.kilojoule_per_mole / unit.nanometer, max_iterations)
    state = context.getState(getPositions=True)
    return np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
