"""Body-frame coordinates: round trip up to a rigid motion, invariance, chirality, and the log-determinant
against autograd through the internal coordinates (the same quotient measure, independently derived)."""

import pytest
import torch

from bg.coordinates import FrameCoordinates, InternalCoordinates, default_roots, random_rotations


def kabsch_rmsd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """RMSD ``(B,)`` of y to x after the best proper rotation and translation (no reflection)."""
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    u, _, vt = torch.linalg.svd(y.transpose(1, 2) @ x)
    d = torch.sign(torch.linalg.det(u @ vt))
    fix = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    rot = u @ fix @ vt
    return (y @ rot - x).square().sum(-1).mean(-1).sqrt()


@pytest.fixture(scope="module")
def frames(aldp_frames):
    return torch.as_tensor(aldp_frames, dtype=torch.float64)


@pytest.fixture(scope="module")
def frame(aldp_system, frames):
    return FrameCoordinates(aldp_system.topology).fit(frames[:150].numpy())


def test_default_roots_are_two_bonds_from_one_atom(aldp_system):
    a, b, c = default_roots(aldp_system.topology)
    bonds = {frozenset((x.index, y.index)) for x, y in aldp_system.topology.bonds}
    assert frozenset((a, b)) in bonds and frozenset((a, c)) in bonds
    names = [aldp_system.topology.atom(i).name for i in (a, b, c)]
    assert names == ["CA", "N", "C"]


def test_round_trip_up_to_a_rigid_motion_and_standardised(frame, frames):
    x = frames[150:]
    y, log_det = frame(x)
    assert y.shape == (len(x), 20, 3) and y[:, 0].isfinite().all()
    back, log_det_inv = frame.inverse(y)
    assert kabsch_rmsd(x, back).max() < 1e-9  # a proper rotation: chirality kept
    torch.testing.assert_close(back.mean(1), torch.zeros(len(x), 3, dtype=back.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(log_det_inv, -log_det)
    # the fitted standardisation: training frames come out with zero mean, unit spread per entry
    y_train = frame(frames[:150])[0]
    torch.testing.assert_close(y_train.mean(0), torch.zeros(20, 3, dtype=y.dtype), atol=1e-9, rtol=0)
    torch.testing.assert_close(y_train.std(0), torch.ones(20, 3, dtype=y.dtype), atol=1e-9, rtol=0)


def test_invariant_to_rigid_motions_but_not_to_mirroring(frame, frames):
    x = frames[:8]
    rot = random_rotations(len(x), x.dtype, generator=torch.Generator().manual_seed(0))
    moved = x @ rot.transpose(1, 2) + torch.randn(len(x), 1, 3, dtype=x.dtype)
    (y, ld), (y2, ld2) = frame(x), frame(moved)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(ld2, ld)
    assert (frame(-x)[0] - y).abs().amax() > 1.0  # the mirror image is another point: z → −z


def test_log_det_matches_autograd_through_internal_coordinates(aldp_system, frames, frame):
    # Both representations give densities on the quotient of Cartesian space by rigid motions in one
    # measure, so log|det ∂y/∂z| of the square map z (internal) -> x -> y (frame) must equal the difference
    # of their forward log-determinants at x.
    ic = InternalCoordinates(aldp_system.topology)
    for x in frames[:3]:
        z, ld_ic = ic(x[None])
        jac = torch.autograd.functional.jacobian(lambda v: frame(ic.inverse(v[None])[0])[0].reshape(-1), z[0])
        assert jac.shape == (frame.dim, frame.dim) == (60, 60)
        expected = frame(x[None])[1] - ld_ic
        torch.testing.assert_close(torch.linalg.slogdet(jac)[1], expected[0], rtol=0, atol=1e-8)


def test_rejects_bad_roots_and_shapes(aldp_system, frame):
    with pytest.raises(ValueError, match="distinct"):
        FrameCoordinates(aldp_system.topology, roots=(0, 0, 1))
    with pytest.raises(ValueError, match="shape"):
        frame(torch.zeros(2, 5, 3, dtype=torch.float64))
