"""Built-in systems by name, so configs can say ``system: aldp``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bg.systems.peptide import build_capped_peptide
from bg.systems.protein import load_pdb
from bg.systems.system import MolecularSystem

#: file suffixes ``get_system`` reads as structures
STRUCTURE_SUFFIXES = (".pdb", ".cif", ".mmcif")

BUILTIN_SYSTEMS = {
    "aldp": "alanine dipeptide ACE-ALA-NME (22 atoms), amber99sbildn + amber99_obc, 300 K, no constraints, no cutoff",
}


def aldp(temperature: float = 300.0) -> MolecularSystem:
    """The standard alanine dipeptide of the Boltzmann-generator literature."""
    return build_capped_peptide("A", forcefield="amber99sbildn-obc", temperature=temperature, name="aldp")


def get_system(spec: str, temperature: float = 300.0, forcefield: str | None = None,
               constraints: str | None = None) -> MolecularSystem:
    """Resolve a system from a name or path.

    ``"aldp"``; ``"peptide:<SEQ>"`` for a capped peptide (amber14-obc2 unless ``forcefield``);
    a path to a ``.pdb``/``.cif`` file (amber14-obc2 unless ``forcefield``); a directory written
    by ``MolecularSystem.save``. ``constraints`` (``"hbonds"``, …; ``None``/``"none"``: none) sets the system's
    constraints: those bonds' terms leave its energy and its MD holds them fixed.
    """
    system = _get_system(spec, temperature, forcefield)
    if constraints is not None:
        system = dataclasses.replace(system, constraints=constraints)  # "none" reads as None there
    return system


def _get_system(spec: str, temperature: float, forcefield: str | None) -> MolecularSystem:
    if spec == "aldp":
        if forcefield not in (None, "amber99sbildn-obc"):
            raise ValueError("the built-in 'aldp' uses amber99sbildn-obc; use 'peptide:A' for another force field")
        return aldp(temperature)
    if spec.startswith("peptide:"):
        seq = spec.split(":", 1)[1]
        return build_capped_peptide(seq, forcefield=forcefield or "amber14-obc2", temperature=temperature)
    path = Path(spec)
    if path.is_dir() and (path / "system.json").exists():
        return MolecularSystem.load(path)
    if path.suffix.lower() in STRUCTURE_SUFFIXES:
        return load_pdb(path, forcefield=forcefield or "amber14-obc2", temperature=temperature)
    raise ValueError(
        f"unknown system {spec!r}: use one of {sorted(BUILTIN_SYSTEMS)}, 'peptide:<one-letter sequence>', "
        "a .pdb/.cif file, or a directory written by MolecularSystem.save"
    )


def molecule_system(molecule: str, temperature: float = 300.0, forcefield: str | None = None) -> MolecularSystem:
    """A structure file (``.pdb``/``.cif``), a directory written by ``MolecularSystem.save``, or else a one-letter
    peptide sequence, capped with Ace/Nme (what a transferable generator is asked to sample)."""
    path = Path(molecule)
    if path.suffix.lower() in STRUCTURE_SUFFIXES or path.is_dir():
        return get_system(molecule, temperature=temperature, forcefield=forcefield)
    return get_system(f"peptide:{molecule.upper()}", temperature=temperature, forcefield=forcefield)
