"""LightningDataModules that turn MD trajectories into training batches."""

from datamodules.md import MDDataModule

__all__ = ["MDDataModule"]
