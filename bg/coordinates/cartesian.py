"""Cartesian representation: centred, scaled frames, with random rotations for augmentation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bg.coordinates.com import centred


def random_rotations(n: int, dtype: torch.dtype = torch.float32, device=None, generator: torch.Generator | None = None) -> Tensor:
    """``n`` rotation matrices ``(n, 3, 3)`` drawn uniformly (Haar) from SO(3) via unit quaternions."""
    q = torch.randn(n, 4, dtype=torch.float64, generator=generator).to(device)
    q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    r = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(n, 3, 3)
    return r.to(dtype)


class CartesianCoordinates(nn.Module):
    """x ``(B, N, 3)`` nm ↔ y = (x − centroid(x)) / scale ``(B, N, 3)`` (dimensionless).

    The centroid is the unweighted centre of geometry; y lives in the 3(N−1)-dimensional
    subspace of zero centroid, and log-dets are w.r.t. Lebesgue measure on that subspace:
    ``forward`` returns −3(N−1)·log(scale), ``inverse`` +3(N−1)·log(scale) (constants per batch).
    ``inverse`` returns centred positions; a flow's density on the subspace is then the density
    of x modulo translation, as for internal coordinates.

    Args:
        n_atoms: N.
        scale: nm per unit of y (a global scale so flows see O(1) numbers); ``None``: 1 until
            :meth:`fit` sets it to the RMS of the centred training coordinates.
    """

    def __init__(self, n_atoms: int, scale: float | None = None):
        super().__init__()
        if scale is not None and scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.n_atoms, self.fixed_scale = n_atoms, scale is not None
        # a buffer, so that a scale fitted to data travels with the model's checkpoints
        self.register_buffer("scale", torch.tensor(float(scale or 1.0), dtype=torch.float64))

    @torch.no_grad()
    def fit(self, x: Tensor) -> "CartesianCoordinates":
        """Set the scale to the RMS of the centred coordinates of frames ``(F, N, 3)`` nm (unless it was given)."""
        if not self.fixed_scale:
            self.scale.fill_(float(centred(x.double()).square().mean().sqrt()))
        return self

    @property
    def dim(self) -> int:
        """Degrees of freedom after centring: 3(N − 1)."""
        return 3 * (self.n_atoms - 1)

    def log_scale(self, x: Tensor) -> Tensor:
        """3(N − 1)·log(scale) ``(B,)`` for the frames of x: log|det| of y → x on the centred subspace."""
        return (self.dim * torch.log(self.scale)).to(x.dtype).expand(x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"expected positions of shape (batch, {self.n_atoms}, 3), got {tuple(x.shape)}")
        return centred(x) / self.scale, -self.log_scale(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return centred(y) * self.scale, self.log_scale(y)

    def augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Centre each frame and rotate it by an independent uniform random rotation."""
        x = centred(x)
        r = random_rotations(x.shape[0], x.dtype, x.device, generator)
        return x @ r.transpose(-1, -2)
