"""`MolecularSystem`: topology + OpenMM System factory + reference positions."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import mdtraj as md
import numpy as np
import openmm
from openmm import app, unit

#: k_B in kJ/(mol K) (CODATA, as OpenMM uses).
BOLTZMANN_KJ_PER_MOL_K = (unit.BOLTZMANN_CONSTANT_kB * unit.AVOGADRO_CONSTANT_NA).value_in_unit(
    unit.kilojoule_per_mole / unit.kelvin
)

#: Named force fields: OpenMM XML files. Any tuple of XML files OpenMM knows works too.
FORCEFIELDS: dict[str, tuple[str, ...]] = {
    "amber99sbildn-obc": ("amber99sbildn.xml", "amber99_obc.xml"),
    "amber99sbildn-vacuum": ("amber99sbildn.xml",),
    "amber14-obc2": ("amber14-all.xml", "implicit/obc2.xml"),
    "amber14-obc1": ("amber14-all.xml", "implicit/obc1.xml"),
    "amber14-gbn2": ("amber14-all.xml", "implicit/gbn2.xml"),
    "amber14-vacuum": ("amber14-all.xml",),
    "charmm36-vacuum": ("charmm36.xml",),
}

_CONSTRAINTS = {None: None, "none": None, "hbonds": app.HBonds, "allbonds": app.AllBonds, "hangles": app.HAngles}


def resolve_forcefield(forcefield: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A preset name (see ``FORCEFIELDS``) or a list of OpenMM XML files → tuple of XML files."""
    if isinstance(forcefield, str):
        if forcefield in FORCEFIELDS:
            return FORCEFIELDS[forcefield]
        if forcefield.endswith(".xml"):
            return (forcefield,)
        raise ValueError(
            f"unknown force field {forcefield!r}; use one of {sorted(FORCEFIELDS)} or a list of OpenMM XML files"
        )
    files = tuple(forcefield)
    try:
        app.ForceField(*files)
    except Exception as exc:  # OpenMM raises ValueError/FileNotFoundError with little context
        raise ValueError(f"OpenMM cannot load force field files {files}: {exc}") from exc
    return files


def kT_kJ_per_mol(temperature: float) -> float:
    """k_B T in kJ/mol for a temperature in K."""
    return BOLTZMANN_KJ_PER_MOL_K * float(temperature)


@dataclass
class MolecularSystem:
    """A molecule ready for simulation and energy evaluation.

    Attributes:
        name: short identifier (used in file names and logs).
        omm_topology: OpenMM topology, atoms in the order used everywhere in bg.
        positions: reference positions ``(N, 3)`` in nm, float64 (minimised for built systems).
        forcefield: OpenMM force-field XML files.
        temperature: K.
        constraints: ``None``, ``"hbonds"``, ``"allbonds"`` or ``"hangles"``.
        nonbonded_cutoff: nm, or ``None`` for no cutoff (the default for implicit solvent here).
    """

    name: str
    omm_topology: app.Topology
    positions: np.ndarray
    forcefield: tuple[str, ...]
    temperature: float = 300.0
    constraints: str | None = None
    nonbonded_cutoff: float | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        if self.positions.shape[0] != self.omm_topology.getNumAtoms():
            raise ValueError(
                f"{self.name}: {self.positions.shape[0]} positions for {self.omm_topology.getNumAtoms()} atoms"
            )
        self.forcefield = resolve_forcefield(self.forcefield)
        if isinstance(self.constraints, str):
            self.constraints = self.constraints.lower()
        if self.constraints not in _CONSTRAINTS:
            raise ValueError(f"constraints must be one of {[k for k in _CONSTRAINTS if k]} or None")
        if self.constraints == "none":
            self.constraints = None

    @property
    def n_atoms(self) -> int:
        return self.omm_topology.getNumAtoms()

    @property
    def kT(self) -> float:
        """k_B T in kJ/mol."""
        return kT_kJ_per_mol(self.temperature)

    @cached_property
    def topology(self) -> md.Topology:
        """The mdtraj topology (same atom order)."""
        return md.Topology.from_openmm(self.omm_topology)

    def create_openmm_system(self, hydrogen_mass: float | None = None) -> openmm.System:
        """A fresh OpenMM ``System`` (no barostat; a CMMotionRemover is not added). ``hydrogen_mass`` (amu):
        hydrogen mass repartitioning by OpenMM (each hydrogen this heavy, the difference taken from its bonded
        atom), for dynamics only: masses do not enter the energy."""
        ff = app.ForceField(*self.forcefield)
        kwargs = dict(constraints=_CONSTRAINTS[self.constraints], removeCMMotion=False, rigidWater=False)
        if hydrogen_mass is not None:
            kwargs["hydrogenMass"] = hydrogen_mass * unit.amu
        if self.nonbonded_cutoff is None:
            kwargs["nonbondedMethod"] = app.NoCutoff
        else:
            kwargs["nonbondedMethod"] = app.CutoffNonPeriodic
            kwargs["nonbondedCutoff"] = self.nonbonded_cutoff * unit.nanometer
        try:
            return ff.createSystem(self.omm_topology, **kwargs)
        except ValueError as exc:
            raise ValueError(f"{self.name}: force field {self.forcefield} cannot parametrise the molecule: {exc}") from exc

    def constrained_bonds(self) -> list[tuple[int, int]]:
        """The atom index pairs whose distance the OpenMM system constrains (``constraints``; empty without):
        the bonds a flow over internal coordinates freezes (``InternalCoordinates(frozen_bonds=...)``)."""
        if not self.constraints:
            return []
        omm = self.create_openmm_system()
        return [tuple(omm.getConstraintParameters(i)[:2]) for i in range(omm.getNumConstraints())]

    def trajectory(self, xyz: np.ndarray | None = None) -> md.Trajectory:
        """An mdtraj trajectory of ``xyz`` ``(F, N, 3)`` nm (default: the reference positions)."""
        xyz = self.positions[None] if xyz is None else np.asarray(xyz).reshape(-1, self.n_atoms, 3)
        return md.Trajectory(xyz.astype(np.float32), self.topology)

    # ------------------------------------------------------------------ persistence
    def _settings(self) -> dict:
        return dict(name=self.name, forcefield=list(self.forcefield), temperature=self.temperature,
                    constraints=self.constraints, nonbonded_cutoff=self.nonbonded_cutoff, metadata=self.metadata)

    def _pdb_text(self) -> str:
        buf = io.StringIO()
        app.PDBFile.writeFile(self.omm_topology, self.positions * unit.nanometer, buf, keepIds=True)
        return buf.getvalue()

    def to_dict(self) -> dict:
        """Everything needed to rebuild the system, as plain data (PDB text, full-precision positions,
        settings), e.g. to travel inside a checkpoint."""
        return dict(self._settings(), pdb=self._pdb_text(), positions=np.asarray(self.positions).tolist())

    @classmethod
    def from_dict(cls, spec: dict) -> "MolecularSystem":
        """The inverse of :meth:`to_dict`."""
        spec = dict(spec)
        pdb = app.PDBFile(io.StringIO(spec.pop("pdb")))
        positions = np.asarray(spec.pop("positions"), dtype=np.float64)
        return cls(omm_topology=pdb.topology, positions=positions, **spec)

    def save(self, directory: str | Path) -> Path:
        """Write ``<name>.pdb`` (topology + reference positions, full precision kept in .npy) and
        ``system.json`` (force field, temperature, settings) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "topology.pdb").write_text(self._pdb_text())
        np.save(directory / "positions.npy", self.positions)
        (directory / "system.json").write_text(json.dumps(self._settings(), indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "MolecularSystem":
        """Read a system written by :meth:`save`."""
        directory = Path(directory)
        spec = json.loads((directory / "system.json").read_text())
        pdb = app.PDBFile(str(directory / "topology.pdb"))
        positions = np.load(directory / "positions.npy")
        return cls(omm_topology=pdb.topology, positions=positions, **spec)
