"""bg: Boltzmann generators in PyTorch Lightning.

Subpackages (dependencies point one way): ``bg.systems``, ``bg.energy``, ``bg.coordinates``
← flows ← models ← ``callbacks``/``datamodules`` ← ``bg.cli``.
"""

__version__ = "0.1.0"
