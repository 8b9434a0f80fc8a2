"""Representations: bijections between Cartesian frames and the spaces flows work in."""

from bg.coordinates.cartesian import CartesianCoordinates, random_rotations
from bg.coordinates.internal import InternalCoordinates
from bg.coordinates.zmatrix import ZMatrix, build_zmatrix, is_backbone_atom

__all__ = ["CartesianCoordinates", "InternalCoordinates", "ZMatrix", "build_zmatrix", "is_backbone_atom",
           "random_rotations"]
