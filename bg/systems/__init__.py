"""Molecular systems: topology, OpenMM force field, reference positions, and MD."""

from bg.systems.builtin import BUILTIN_SYSTEMS, aldp, get_system, molecule_system
from bg.systems.peptide import build_capped_peptide
from bg.systems.protein import load_pdb
from bg.systems.simulate import MDSettings, load_md, simulate, trajectory_files
from bg.systems.system import FORCEFIELDS, MolecularSystem, kT_kJ_per_mol

__all__ = ["BUILTIN_SYSTEMS", "FORCEFIELDS", "MDSettings", "MolecularSystem", "aldp", "build_capped_peptide",
           "get_system", "molecule_system", "kT_kJ_per_mol", "load_md", "load_pdb", "simulate", "trajectory_files"]
