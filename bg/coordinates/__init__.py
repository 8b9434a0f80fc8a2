"""Representations: bijections between Cartesian frames and the spaces flows work in."""

from bg.coordinates.cartesian import CartesianCoordinates, random_rotations
from bg.coordinates.com import COM_CORRECTIONS, add_com_noise, centre_of_mass, centred, com_log_density
from bg.coordinates.frame import FrameCoordinates, default_roots
from bg.coordinates.internal import InternalCoordinates
from bg.coordinates.rotors import rotor_groups, turn_rotors
from bg.coordinates.torsions import TorsionTurns, torsion_turns
from bg.coordinates.zmatrix import ZMatrix, build_zmatrix, is_backbone_atom

__all__ = ["COM_CORRECTIONS", "CartesianCoordinates", "add_com_noise", "centre_of_mass", "centred", "com_log_density", "default_roots", "FrameCoordinates", "InternalCoordinates", "ZMatrix", "build_zmatrix", "is_backbone_atom",
           "random_rotations", "rotor_groups", "TorsionTurns", "torsion_turns", "turn_rotors"]
