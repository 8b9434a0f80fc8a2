"""Choosing the target energy: the torch force field where it applies, OpenMM otherwise."""

from __future__ import annotations

import logging

import openmm
from torch import nn

from bg.energy.openmm_energy import OpenMMEnergy
from bg.energy.torch_energy import TorchEnergy, UnsupportedForceError
from bg.systems.system import MolecularSystem

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openmm")


def target_energy(
    system: MolecularSystem | openmm.System,
    temperature: float | None = None,
    backend: str = "auto",
    compile: bool = True,
    n_workers: int = 0,
    platform: str = "auto",
) -> nn.Module:
    """u(x) in kT for a system: ``(B, N, 3)`` nm → ``(B,)``, differentiable.

    Args:
        system: a ``MolecularSystem`` (its temperature is used) or an ``openmm.System``.
        temperature: K; required for an ``openmm.System``, overrides the system's otherwise.
        backend: ``"torch"`` (``TorchEnergy``, batched, on the model's device), ``"openmm"``
            (``OpenMMEnergy``, the reference), or ``"auto"``: torch when it supports every force of
            the system, else OpenMM (logged).
        compile: ``torch.compile`` the torch force field (see ``TorchEnergy``).
        n_workers, platform: settings of ``OpenMMEnergy``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"energy backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(system, MolecularSystem):
        temperature = system.temperature if temperature is None else temperature
        omm = system.create_openmm_system()
    else:
        if temperature is None:
            raise ValueError("target_energy needs a temperature for an openmm.System")
        omm = system
    if backend in ("auto", "torch"):
        try:
            return TorchEnergy.from_openmm(omm, temperature, compile=compile)
        except UnsupportedForceError as exc:
            if backend == "torch":
                raise
            log.info("torch force field unavailable (%s); using OpenMMEnergy", exc)
    return OpenMMEnergy(omm, temperature, n_workers=n_workers, platform=platform)
