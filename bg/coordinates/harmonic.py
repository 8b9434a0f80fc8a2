"""The harmonic (Laplace) approximation of a molecule's Boltzmann distribution in internal coordinates.

A flow over internal coordinates needs, for every coordinate, an interval to put its spline on and a
base distribution to start from. Fitted to a molecule's MD these come from the data; a generator that
samples molecules it has never seen (``bg.models.TransferableNSF``) must get them from the molecule alone.
This module takes them from its force field:

- **rotatable torsions** (:func:`rotatable_torsions`) are proper dihedrals about a single bond that is
  neither in a ring nor between two three-connected atoms (amide C–N, aromatic and guanidinium bonds are
  planar): φ, ψ, χ and methyl rotors. They stay on the circle.
- every other coordinate (bonds, angles, dihedrals relative to a sibling atom, planar and ring torsions)
  fluctuates about the energy minimum: :func:`harmonic_geometry` minimises the template structure, takes
  the Hessian H of u (kT) over these coordinates at the minimum (the rotatable torsions held there) and
  returns the centre z₀, the covariance H⁻¹ of exp(−½ δzᵀ H δz) and its marginal standard deviations
  σ = √diag(H⁻¹).
- every **rotatable torsion** gets a rigid energy scan (:func:`torsion_scan`): u along a full turn of that
  torsion, all other coordinates held at the minimum. exp(−u/T) is a first guess of the torsion's marginal
  (a rigid scan ignores relaxation and coupling between torsions, so the flow that uses it softens it and
  learns the rest).

On alanine dipeptide (amber99sbildn + OBC, 300 K) the σ agree with 10 ns of MD to within 6 % for every
bond, angle and non-rotatable torsion, and the rule picks exactly φ, ψ and the three methyl rotors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mdtraj as md
import numpy as np
import torch
from torch import Tensor

from bg.coordinates.internal import InternalCoordinates
from bg.coordinates.geometry import wrap_angle


@dataclass
class HarmonicGeometry:
    """Per free coordinate ``(D,)``: ``centre`` (nm, rad; the minimum), ``sigma`` (harmonic marginal standard
    deviation; NaN for rotatable torsions) and ``rotatable`` (True for rotatable torsions); ``covariance``
    ``(S, S)``: H⁻¹ over the S stiff (non-rotatable) coordinates, in their order in ``z``;
    ``torsion_energy`` ``(R, K)``: :func:`torsion_scan` of the R rotatable torsions (in their order in ``z``)
    at K bin centres, kT above each scan's minimum."""

    centre: Tensor
    sigma: Tensor
    rotatable: Tensor
    covariance: Tensor
    torsion_energy: Tensor


def bond_graph(topology: md.Topology) -> list[set[int]]:
    """The bonded neighbours of every atom."""
    neighbours: list[set[int]] = [set() for _ in range(topology.n_atoms)]
    for a, b in topology.bonds:
        neighbours[a.index].add(b.index)
        neighbours[b.index].add(a.index)
    return neighbours


def bond_in_ring(neighbours: list[set[int]], a: int, b: int) -> bool:
    """Whether the bond a–b lies on a ring: b is reachable from a without crossing that bond."""
    seen, stack = {a}, [n for n in neighbours[a] if n != b]
    seen.update(stack)
    while stack:
        node = stack.pop()
        if node == b:
            return True
        for n in neighbours[node] - seen:
            seen.add(n)
            stack.append(n)
    return False


def rotatable_torsions(representation: InternalCoordinates) -> Tensor:
    """``(D,)`` True for the free coordinates that are rotatable torsions (see module docstring)."""
    neighbours = bond_graph(representation.topology)
    rows = representation.coordinate_table()
    out = torch.zeros(len(rows), dtype=torch.bool)
    for row in rows:
        if row["kind"] != "torsion":
            continue
        a, p, g, d = row["atom_indices"]
        if d in neighbours[p]:  # relative to a sibling atom: set by the angles at p
            continue
        planar = len(neighbours[p]) == 3 and len(neighbours[g]) == 3
        out[row["index"]] = not planar and not bond_in_ring(neighbours, p, g)
    return out


def scan_grid(points: int) -> Tensor:
    """The centres ``(points,)`` of ``points`` equal bins over [−π, π) (rad, float64)."""
    return -math.pi + (torch.arange(points, dtype=torch.float64) + 0.5) * (2 * math.pi / points)


def torsion_scan(representation: InternalCoordinates, energy: Callable[[Tensor], Tensor], centre: Tensor,
                 rotatable: Tensor, points: int = 360) -> Tensor:
    """Rigid scans ``(R, points)`` of the R ``rotatable`` torsions (a ``(D,)`` mask): u (kT, minus each row's
    minimum) with one torsion at each of the :func:`scan_grid` centres and every other free coordinate at
    ``centre`` ``(D,)``. Atoms placed relative to the turned one (siblings) turn with it."""
    grid = scan_grid(points).to(centre)
    rows = []
    with torch.no_grad():
        for i in torch.nonzero(rotatable).flatten().tolist():
            z = centre.repeat(points, 1)
            z[:, i] = grid
            u = energy(representation.inverse(z)[0]).double()
            rows.append(u - u.min())
    return torch.stack(rows) if rows else centre.new_zeros(0, points)


def harmonic_geometry(representation: InternalCoordinates, energy: Callable[[Tensor], Tensor],
                      positions: Tensor | np.ndarray, min_eigenvalue: float = 1.0,
                      scan_points: int = 360) -> HarmonicGeometry:
    """The harmonic approximation about ``positions`` (``(N, 3)`` nm, a local energy minimum; see module
    docstring).

    Args:
        representation: the molecule's internal coordinates (full, not reduced).
        energy: u(x) in kT, ``(B, N, 3)`` nm → ``(B,)``, twice differentiable (the torch force field).
        positions: the minimised template.
        min_eigenvalue: eigenvalues of the Hessian below this (kT per unit²) are raised to it, so that a
            template slightly off its minimum, or a soft mode, gives a wide σ rather than none.
        scan_points: grid points of each rotatable torsion's :func:`torsion_scan`; 0: no scans
            (``torsion_energy`` is then ``(R, 0)``).
    """
    if representation.has_frozen:
        raise ValueError("harmonic_geometry needs the full internal coordinates (reduced=False, no frozen bonds)")
    x0 = torch.as_tensor(np.asarray(positions), dtype=torch.float64)[None]
    centre = representation(x0)[0][0].detach()
    rotatable = rotatable_torsions(representation)
    stiff = torch.nonzero(~rotatable).flatten()

    def u_of(z_stiff: Tensor) -> Tensor:
        z = centre.clone()
        z[stiff] = z_stiff
        return energy(representation.inverse(z[None])[0])[0]

    hessian = torch.autograd.functional.hessian(u_of, centre[stiff])
    values, vectors = torch.linalg.eigh((hessian + hessian.T) / 2)
    covariance = (vectors / values.clamp(min=min_eigenvalue)) @ vectors.T
    sigma = torch.full_like(centre, float("nan"))
    sigma[stiff] = covariance.diagonal().sqrt()
    scan = (torsion_scan(representation, energy, centre, rotatable, scan_points) if scan_points > 0
            else centre.new_zeros(int(rotatable.sum()), 0))
    centre = torch.where(representation.is_torsion, wrap_angle(centre), centre)
    return HarmonicGeometry(centre=centre, sigma=sigma, rotatable=rotatable, covariance=covariance,
                            torsion_energy=scan)
