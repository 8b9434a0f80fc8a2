"""Proteins from PDB/mmCIF files: waters and ions stripped, missing hydrogens added."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from openmm import app, unit

from bg.systems.peptide import ONE_TO_THREE, add_hydrogens, minimize_positions
from bg.systems.system import MolecularSystem, resolve_forcefield

#: Residue names the built-in Amber/CHARMM force fields parametrise (protonation variants and caps).
KNOWN_RESIDUES = frozenset(ONE_TO_THREE.values()) | {
    "HID", "HIE", "HIP", "HSD", "HSE", "HSP", "CYX", "CYM", "ASH", "GLH", "LYN", "ACE", "NME", "NMA", "NH2",
}
_WATERS = frozenset({"HOH", "WAT", "H2O", "TIP", "TIP3", "TIP4", "SOL", "DOD"})
_IONS = frozenset({"NA", "CL", "K", "MG", "CA", "ZN", "MN", "FE", "CU", "CO", "NI", "CD", "BR", "IOD", "LI", "CS", "RB", "SO4", "PO4"})


def load_pdb(
    path: str | Path,
    forcefield: str | tuple[str, ...] = "amber14-obc2",
    temperature: float = 300.0,
    name: str | None = None,
    minimize: bool = True,
    constraints: str | None = None,
) -> MolecularSystem:
    """Load a protein from a PDB or PDBx/mmCIF file (first model).

    Waters and ions are removed and missing hydrogens are added for pH 7 (existing ones kept).
    A residue the force field does not know (e.g. NLE in 2F4K) or a ligand is an error naming
    residue, file and fix. With ``minimize`` the structure is relaxed (tolerance 10 kJ/mol/nm).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such structure file; pass the path of a PDB or mmCIF file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; pass a PDB or mmCIF file with coordinates")
    files = resolve_forcefield(forcefield)
    try:
        structure = app.PDBxFile(str(path)) if path.suffix.lower() in {".cif", ".mmcif"} else app.PDBFile(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: OpenMM cannot read this structure file ({exc}); check its format") from exc
    if structure.topology.getNumAtoms() == 0:
        raise ValueError(f"{path}: no atoms found; pass a PDB or mmCIF file with ATOM records")
    modeller = app.Modeller(structure.topology, structure.positions)
    # Implicit solvent, no periodicity: a (often dummy) CRYST1 box would only follow into saved files.
    modeller.topology.setPeriodicBoxVectors(None)
    modeller.deleteWater()
    modeller.delete([r for r in modeller.topology.residues() if r.name.upper() in _WATERS | _IONS])
    for res in modeller.topology.residues():
        if res.name not in KNOWN_RESIDUES:
            raise ValueError(
                f"{path}: residue {res.name}{res.id} (chain {res.chain.id}) is not a residue the force field "
                f"{'+'.join(files)} knows; replace it (e.g. NLE→MET or LYS, MSE→MET) or remove it, "
                "or pass force-field XML files that define it"
            )
    ff = app.ForceField(*files)
    try:
        add_hydrogens(modeller, ff)
    except Exception as exc:
        raise ValueError(
            f"{path}: adding hydrogens failed ({exc}); the file may miss heavy atoms — repair it with PDBFixer first"
        ) from exc
    system = MolecularSystem(
        name=name or path.stem,
        omm_topology=modeller.topology,
        positions=np.asarray(modeller.positions.value_in_unit(unit.nanometer)),
        forcefield=files,
        temperature=temperature,
        constraints=constraints,
        metadata={"source": str(path)},
    )
    try:
        system.create_openmm_system()
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}; missing heavy atoms can be rebuilt with PDBFixer") from exc
    if minimize:
        system.positions = minimize_positions(system)
    return system
