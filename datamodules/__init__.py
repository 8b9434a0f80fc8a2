"""LightningDataModules that turn MD trajectories into training batches."""

from datamodules.md import MDDataModule
from datamodules.peptides import PeptideSetDataModule

__all__ = ["MDDataModule", "PeptideSetDataModule"]
