"""Generator families as LightningModules over a shared base (``BoltzmannGenerator``)."""

from bg.models.base import BoltzmannGenerator
from bg.models.cnf import EquivariantCNF
from bg.models.nsf import SplitChannelNSF
from bg.models.tarflow import TarFlowGenerator
from bg.models.transferable_cnf import TransferableCNF
from bg.models.transferable_nsf import TransferableNSF

__all__ = ["BoltzmannGenerator", "EquivariantCNF", "SplitChannelNSF", "TarFlowGenerator", "TransferableCNF",
           "TransferableNSF"]
