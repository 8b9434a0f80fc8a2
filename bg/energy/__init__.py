"""Target energies u(x) in kT: the OpenMM bridge, the batched torch force field, regularisers."""

from bg.energy.factory import LazyTargetEnergy, target_energy
from bg.energy.openmm_energy import OpenMMEnergy
from bg.energy.regularize import RegularizedEnergy, linlog_cut
from bg.energy.torch_energy import TorchEnergy, UnsupportedForceError

__all__ = ["LazyTargetEnergy", "OpenMMEnergy", "RegularizedEnergy", "TorchEnergy", "UnsupportedForceError", "linlog_cut", "target_energy"]
