"""Do MD frames belong to this energy function? A check of the data against the force field it will be judged by.

Frames drawn at temperature T from exp(−u) sit, in a harmonic picture, a potential energy of about dof/2 kT
above their local minimum (equipartition; dof = 3N − 6 − constraints). :func:`thermal_excess` measures the
median excess of a handful of frames over the minimum reached from the lowest of them and calls it
implausible outside [``low``, ``high``] × dof/2 (± ``slack`` kT). Measured on alanine dipeptide's
replica-exchange data here: the 300 K frames 29.7 kT for dof/2 = 30; the 600 K frames, or the
300 K ones judged at 150 K, ≈ 2 × dof/2; frames with 0.01 nm of noise 374 kT. Frames from another temperature,
a topology whose atoms do not match the trajectory, or an MD not yet equilibrated fall outside; two
similar force fields (amber99sbildn and amber14, both with OBC) do not — that mismatch is refused by name
(the force field travels with bg's data).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from bg.energy.openmm_energy import OpenMMEnergy
from bg.systems import MolecularSystem
from bg.systems.peptide import minimize_positions


@dataclass(frozen=True)
class EnergyCheck:
    """Attributes:
        excess: median of u(frame) − u(minimum) over the checked frames, kT.
        expected: dof/2, kT (equipartition of the potential energy).
        dof: 3N − 6 − constraints.
        n_frames: frames checked.
        plausible: ``excess`` within [low, high] × ``expected`` (± slack).
    """

    excess: float
    expected: float
    dof: int
    n_frames: int
    plausible: bool

    def summary(self, forcefield: str) -> str:
        line = (f"energy check: {self.n_frames} frames lie a median {self.excess:.0f} kT above their minimised lowest "
                f"frame under {forcefield} (thermal fluctuations: about dof/2 = {self.expected:.0f} kT)")
        if not self.plausible:
            hint = ("were the trajectories made with this force field, at this temperature, with this topology's atom "
                    "order?" if self.excess > self.expected else "is the MD equilibrated, and at this temperature?")
            line += f"; warning: {'far more' if self.excess > self.expected else 'far less'} than thermal: {hint}"
        return line


def thermal_excess(system: MolecularSystem, frames: np.ndarray | torch.Tensor, n_frames: int = 32,
                   low: float = 0.5, high: float = 1.5, slack: float = 5.0) -> EnergyCheck:
    """Compare ``n_frames`` evenly strided ``frames`` ``(F, N, 3)`` nm with equipartition under ``system``'s
    force field at its temperature (see module docstring)."""
    x = torch.tensor(np.asarray(frames), dtype=torch.float64)
    x = x[:: max(1, math.ceil(len(x) / n_frames))]
    omm = system.create_openmm_system()
    energy = OpenMMEnergy(omm, system.temperature)
    with torch.no_grad():
        u = energy(x)
    lowest = int(torch.nan_to_num(u, nan=math.inf).argmin())
    start = dataclasses.replace(system, positions=x[lowest].numpy())
    with torch.no_grad():
        u_min = float(energy(torch.as_tensor(minimize_positions(start))[None])[0])
    dof = 3 * system.n_atoms - 6 - omm.getNumConstraints()
    excess = float(torch.nan_to_num(u - u_min, nan=math.inf).median())
    expected = dof / 2
    return EnergyCheck(excess, expected, dof, len(x), low * expected - slack <= excess <= high * expected + slack)
