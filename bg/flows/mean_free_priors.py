"""Base densities of the continuous flow on mean-free frames ``(B, N, 3)`` (``bg.flows.ContinuousFlow``).

Both are Gaussians on the 3(N − 1)-dimensional subspace of frames with zero mean over atoms, invariant to
rotations and reflections, with exact ``log_prob`` (w.r.t. Lebesgue measure on that subspace):

- :class:`IsotropicPrior`: the standard Gaussian, log p₀(x) = −|x|²/2 − 3(N − 1)/2 · log 2π.
- :class:`HarmonicPrior`: precision α·L on each Cartesian axis, L the Laplacian of the molecule's bond
  graph, so bonded atoms start close together and a hydrogen starts next to its heavy atom — the harmonic
  prior of EigenFold and HarmonicFlow (Jing et al. 2023; Stärk et al. 2024). With L = Σ_k λ_k u_k u_kᵀ
  (λ₀ = 0 for the mean, u₀ ∝ 1) the coefficients c_k = u_kᵀ x_d are independent N(0, 1/(αλ_k)), k ≥ 1, so
  log p₀(x) = −½ α Σ_bonds |x_i − x_j|² + 3/2 · Σ_{k≥1} log(αλ_k / 2π).
  α is fitted to training frames by maximum likelihood, α = 3(N − 1) / E[Σ_bonds |x_i − x_j|²], i.e. the
  prior's bonds are as long on average as the data's. It is invariant to permutations of atoms that
  the bond graph cannot tell apart (the H of a methyl group), like the EGNN field.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bg.coordinates import centred


class IsotropicPrior(nn.Module):
    """The standard Gaussian on mean-free frames of ``n_atoms`` atoms (module docstring)."""

    def __init__(self, n_atoms: int):
        super().__init__()
        self.n_atoms = n_atoms

    @property
    def dim(self) -> int:
        return 3 * (self.n_atoms - 1)

    def fit(self, y: Tensor) -> "IsotropicPrior":
        return self

    def sample(self, n: int, dtype: torch.dtype = torch.float32, device=None,
               generator: torch.Generator | None = None) -> Tensor:
        """``n`` centred frames ``(n, N, 3)``."""
        return centred(torch.randn(n, self.n_atoms, 3, dtype=dtype, device=device, generator=generator))

    def log_prob(self, x: Tensor) -> Tensor:
        """log p₀ ``(B,)`` of centred frames ``(B, N, 3)``."""
        return -0.5 * x.square().sum((-1, -2)) - 0.5 * self.dim * math.log(2 * math.pi)


class HarmonicPrior(nn.Module):
    """Gaussian with precision α·L per axis on mean-free frames (module docstring).

    Args:
        n_atoms: N.
        bonds: atom index pairs ``(M, 2)`` of the bond graph; it must connect all N atoms.
    """

    def __init__(self, n_atoms: int, bonds: Tensor):
        super().__init__()
        bonds = torch.as_tensor(bonds, dtype=torch.long).reshape(-1, 2)
        if len(bonds) and (int(bonds.min()) < 0 or int(bonds.max()) >= n_atoms):
            raise ValueError(f"bond indices must lie in [0, {n_atoms}), got {int(bonds.min())}…{int(bonds.max())}")
        adjacency = torch.zeros(n_atoms, n_atoms, dtype=torch.float64)
        adjacency[bonds[:, 0], bonds[:, 1]] = adjacency[bonds[:, 1], bonds[:, 0]] = 1.0
        eigenvalues, modes = torch.linalg.eigh(torch.diag(adjacency.sum(1)) - adjacency)
        if n_atoms < 2 or float(eigenvalues[1]) < 1e-9:
            raise ValueError("the harmonic prior needs a bond graph that connects every atom (a Laplacian with one "
                             f"zero eigenvalue); {int((eigenvalues < 1e-9).sum())} connected components found")
        self.n_atoms = n_atoms
        self.register_buffer("bonds", bonds)
        self.register_buffer("eigenvalues", eigenvalues[1:].clone())  # (N − 1,) λ_k > 0
        self.register_buffer("modes", modes[:, 1:].clone())  # (N, N − 1), orthonormal, ⟂ the mean
        self.register_buffer("alpha", torch.ones((), dtype=torch.float64))

    @property
    def dim(self) -> int:
        return 3 * (self.n_atoms - 1)

    def bond_square_sum(self, x: Tensor) -> Tensor:
        """Σ over bonds of |x_i − x_j|² ``(B,)`` for frames ``(B, N, 3)``."""
        return (x[:, self.bonds[:, 0]] - x[:, self.bonds[:, 1]]).square().sum((-1, -2))

    @torch.no_grad()
    def fit(self, y: Tensor) -> "HarmonicPrior":
        """α = 3(N − 1) / mean Σ_bonds |y_i − y_j|² over training frames ``(F, N, 3)`` (maximum likelihood)."""
        self.alpha.fill_(float(self.dim / self.bond_square_sum(y.double()).mean()))
        return self

    def _precisions(self) -> Tensor:
        return self.alpha * self.eigenvalues  # (N − 1,)

    def sample(self, n: int, dtype: torch.dtype = torch.float32, device=None,
               generator: torch.Generator | None = None) -> Tensor:
        """``n`` mean-free frames ``(n, N, 3)``."""
        z = torch.randn(n, self.n_atoms - 1, 3, dtype=torch.float64, device=device, generator=generator)
        c = z / self._precisions().sqrt().to(z.device)[:, None]
        return torch.einsum("ik,bkd->bid", self.modes.to(z.device), c).to(dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p₀ ``(B,)`` of centred frames ``(B, N, 3)`` (a mean component, if any, is ignored)."""
        precisions = self._precisions().to(x.device)
        quadratic = self.alpha.to(x.device) * self.bond_square_sum(x.double())
        norm = 1.5 * torch.log(precisions / (2 * math.pi)).sum()
        return (-0.5 * quadratic + norm).to(x.dtype)
