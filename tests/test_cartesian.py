import math

import pytest
import torch

from bg.coordinates import CartesianCoordinates, random_rotations


def test_rotations_are_proper_and_uniform():
    r = random_rotations(20000, torch.float64, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(3, dtype=torch.float64).expand_as(r)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(len(r), dtype=torch.float64))
    # Haar measure: E[R] = 0 and E[tr R] = 0 (a bias toward identity would show here).
    assert r.mean(0).abs().max() < 0.03
    assert abs(r.diagonal(dim1=-2, dim2=-1).sum(-1).mean().item()) < 0.03


def test_centre_scale_round_trip_and_log_det(aldp_frames):
    rep = CartesianCoordinates(22, scale=0.3)
    x = torch.tensor(aldp_frames[:10])
    y, ld = rep(x)
    assert y.mean(1).abs().max() < 1e-12
    xr, ld_i = rep.inverse(y)
    torch.testing.assert_close(xr, x - x.mean(1, keepdim=True))
    assert rep.dim == 63
    torch.testing.assert_close(ld, torch.full((10,), -63 * math.log(0.3), dtype=torch.float64))
    torch.testing.assert_close(ld + ld_i, torch.zeros(10, dtype=torch.float64))


def test_augment_keeps_distances_and_centres(aldp_frames):
    rep = CartesianCoordinates(22)
    x = torch.tensor(aldp_frames[:10])
    xa = rep.augment(x, generator=torch.Generator().manual_seed(1))
    d = lambda v: torch.linalg.vector_norm(v[:, :, None] - v[:, None], dim=-1)  # noqa: E731
    torch.testing.assert_close(d(xa), d(x))
    assert xa.mean(1).abs().max() < 1e-12
    assert (xa - (x - x.mean(1, keepdim=True))).abs().max() > 0.01


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale must be positive"):
        CartesianCoordinates(5, scale=0)
    with pytest.raises(ValueError, match=r"shape \(batch, 5, 3\)"):
        CartesianCoordinates(5)(torch.zeros(1, 4, 3))
