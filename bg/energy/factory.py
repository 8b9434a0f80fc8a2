"""Choosing the target energy: the torch force field where it applies, OpenMM otherwise."""

from __future__ import annotations

import logging
from typing import Literal

import openmm
from torch import Tensor, nn

from bg.choices import check_choices
from bg.energy.openmm_energy import OpenMMEnergy
from bg.energy.torch_energy import TorchEnergy, UnsupportedForceError
from bg.systems.system import MolecularSystem

log = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "openmm"]


def target_energy(
    system: MolecularSystem | openmm.System,
    temperature: float | None = None,
    backend: Backend = "auto",
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
    check_choices(target_energy, dict(backend=backend), "energy ")
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


class LazyTargetEnergy:
    """u(x) of a system in kT, built by :func:`target_energy` on first use and moved to the device of the
    positions it is given. Not an ``nn.Module``: a generator holding it keeps the force field's buffers
    out of its checkpoints (the molecule travels there as a description, and the force field is rebuilt).

    Args: as :func:`target_energy` (``n_workers`` for the OpenMM backend).
    """

    def __init__(self, system: MolecularSystem, backend: Backend = "auto", compile: bool = False, n_workers: int = 0):
        self.system, self.backend, self.compile, self.n_workers = system, backend, compile, n_workers
        self._module: nn.Module | None = None

    @property
    def module(self) -> nn.Module:
        """The energy module (built now if needed)."""
        if self._module is None:
            self._module = target_energy(self.system, backend=self.backend, compile=self.compile,
                                         n_workers=self.n_workers)
        return self._module

    def __call__(self, x: Tensor) -> Tensor:
        """u ``(B,)`` (float64, differentiable) of frames ``(B, N, 3)`` nm."""
        module = self.module
        buf = next(iter(module.buffers()), None)
        if buf is not None and buf.device != x.device:
            module.to(x.device)
        return module(x.double())
