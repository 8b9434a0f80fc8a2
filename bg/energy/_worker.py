"""Worker-process side of OpenMMEnergy: one OpenMM Context per process (numpy only, no torch)."""

from __future__ import annotations

import numpy as np

_CONTEXT = None


def init_worker(system_xml: str, platform: str, properties: dict) -> None:
    """Create this process's Context (never before the fork: the CPU platform can hang)."""
    global _CONTEXT
    _CONTEXT = make_context(system_xml, platform, properties)


def make_context(system_xml: str, platform: str, properties: dict):
    import openmm

    system = openmm.XmlSerializer.deserialize(system_xml)
    integrator = openmm.VerletIntegrator(0.001)
    return openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform), properties)


def evaluate(context, positions: np.ndarray, forces: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Energies (kJ/mol) and forces (kJ/mol/nm) of frames ``(B, N, 3)`` nm.

    Frames OpenMM cannot evaluate (NaN input, an exception) get energy NaN and zero forces, and
    are marked in the returned ``failed`` mask.
    """
    import openmm.unit as u

    b = positions.shape[0]
    energies = np.empty(b, dtype=np.float64)
    out = np.zeros_like(positions, dtype=np.float64) if forces else None
    failed = np.zeros(b, dtype=bool)
    for i in range(b):
        try:
            context.setPositions(positions[i])
            state = context.getState(getEnergy=True, getForces=forces)
            energies[i] = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
            if forces:
                out[i] = state.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer)
        except Exception:  # OpenMM raises for NaN coordinates
            energies[i] = np.nan
            failed[i] = True
    return energies, out, failed


def evaluate_in_worker(positions: np.ndarray, forces: bool = True):
    return evaluate(_CONTEXT, positions, forces)
