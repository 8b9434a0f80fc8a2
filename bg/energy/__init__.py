"""Target energies u(x) in kT: the OpenMM bridge and training regularisers."""

from bg.energy.openmm_energy import OpenMMEnergy
from bg.energy.regularize import RegularizedEnergy, linlog_cut

__all__ = ["OpenMMEnergy", "RegularizedEnergy", "linlog_cut"]
