import math

import pytest
import torch

from bg.flows import circular_rq_spline, out_of_bounds, rq_spline


def params(batch: int, k: int, circular: bool, dtype, seed: int = 0, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    w = scale * torch.randn(batch, k, generator=g, dtype=dtype)
    h = scale * torch.randn(batch, k, generator=g, dtype=dtype)
    d = scale * torch.randn(batch, k if circular else k + 1, generator=g, dtype=dtype)
    return w, h, d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("circular", [False, True])
def test_inverse_and_log_dets(dtype, circular):
    n, k = 4000, 8
    w, h, d = params(n, k, circular, dtype)
    low, high = (-math.pi, math.pi) if circular else (0.2, 1.7)
    x = low + (high - low) * torch.rand(n, dtype=dtype, generator=torch.Generator().manual_seed(1))
    fn = circular_rq_spline if circular else (lambda *a, **kw: rq_spline(*a, low=low, high=high, **kw))
    y, ld = fn(x, w, h, d)
    assert y.dtype == dtype and y.min() >= low and y.max() < high + 1e-6
    xr, ld_inv = fn(y, w, h, d, inverse=True)
    eps = torch.finfo(dtype).eps
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    # Round trips are limited by conditioning, in any implementation: x → y → x amplifies the
    # rounding of y (eps·range) by 1/(dy/dx), and y → x → y amplifies that of x by dy/dx.
    yr, ld_r = fn(xr, w, h, d)
    assert torch.all((yr - y).abs() <= tol + 20 * eps * (high - low) * torch.exp(ld))
    assert torch.all((xr - x).abs() <= tol + 20 * eps * (high - low) / torch.exp(ld))
    well = ld.abs() < 2  # slopes between 0.14 and 7.4 (a neighbouring extreme bin can still matter)
    loose = 1e-4 if dtype == torch.float32 else tol
    assert (xr - x)[well].abs().max() < loose and (yr - y)[well].abs().max() < loose
    # The inverse's log-det at y is minus the forward log-det at the point it returns.
    assert (ld_r + ld_inv).abs().max() < (1e-4 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("circular", [False, True])
def test_float32_inverts_to_1e5_for_conditioner_scale_parameters(circular):
    """Unit-scale conditioner outputs (a trained flow's regime): x → y → x within 1e-5 where the
    slope is moderate, in float32."""
    w, h, d = params(4000, 8, circular, torch.float32, seed=9, scale=1.0)
    low, high = (-math.pi, math.pi) if circular else (-1.0, 1.0)
    x = low + (high - low) * torch.rand(4000, generator=torch.Generator().manual_seed(2))
    y, ld = rq_spline(x, w, h, d, low=low, high=high, circular=circular)
    xr, _ = rq_spline(y, w, h, d, low=low, high=high, circular=circular, inverse=True)
    well = ld.abs() < 2
    assert well.float().mean() > 0.5  # the test is not vacuous
    assert (xr - x)[well].abs().max() < 1e-5


@pytest.mark.parametrize("circular", [False, True])
def test_log_det_equals_autograd(circular):
    w, h, d = params(300, 6, circular, torch.float64, seed=3)
    low, high = (-math.pi, math.pi) if circular else (-1.0, 1.0)
    x = (low + (high - low) * torch.rand(300, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    x.requires_grad_(True)
    y, ld = rq_spline(x, w, h, d, low=low, high=high, circular=circular)
    (dy,) = torch.autograd.grad(y.sum(), x)  # elementwise map: the Jacobian is diagonal
    torch.testing.assert_close(ld, torch.log(dy), rtol=1e-9, atol=1e-9)
    yv = y.detach().requires_grad_(True)
    xi, ld_i = rq_spline(yv, w, h, d, low=low, high=high, circular=circular, inverse=True)
    (dx,) = torch.autograd.grad(xi.sum(), yv)
    torch.testing.assert_close(ld_i, torch.log(dx), rtol=1e-9, atol=1e-9)


def test_monotone_and_onto():
    w, h, d = params(1, 10, False, torch.float64, seed=5)
    x = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    y, _ = rq_spline(x, w.expand(2001, -1), h.expand(2001, -1), d.expand(2001, -1))
    assert torch.all(y.diff() > 0)
    assert abs(y[0].item() + 1) < 1e-12 and abs(y[-1].item() - 1) < 1e-12


def test_circular_density_is_continuous_across_pi():
    w, h, d = params(1, 7, True, torch.float64, seed=6)
    eps = 1e-9
    x = torch.tensor([-math.pi, math.pi - eps], dtype=torch.float64)
    _, ld = circular_rq_spline(x, w.expand(2, -1), h.expand(2, -1), d.expand(2, -1))
    assert abs(ld[0].item() - ld[1].item()) < 1e-6
    y, _ = circular_rq_spline(torch.tensor([-math.pi], dtype=torch.float64), w, h, d)
    assert y.item() == -math.pi  # the end points are fixed, so the map is a bijection of the circle


def test_gradients_reach_parameters():
    w, h, d = params(64, 5, True, torch.float32, seed=7)
    for p in (w, h, d):
        p.requires_grad_(True)
    x = torch.rand(64) * 2 * math.pi - math.pi
    y, ld = circular_rq_spline(x, w, h, d)
    (y.sum() + ld.sum()).backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in (w, h, d))


def test_bad_shapes_and_bounds():
    w, h, d = params(3, 4, False, torch.float64)
    with pytest.raises(ValueError, match="needs 5 derivatives, got 4"):
        rq_spline(torch.zeros(3, dtype=torch.float64), w, h, d[:, :4])
    with pytest.raises(ValueError, match="circular spline with 4 bins needs 4 derivatives"):
        circular_rq_spline(torch.zeros(3, dtype=torch.float64), w, h, d)
    with pytest.raises(ValueError, match="same number of bins"):
        rq_spline(torch.zeros(3, dtype=torch.float64), w, h[:, :3], d)
    assert out_of_bounds(torch.tensor([-2.0, 0.0, 1.5]), -1.0, 1.0) == 2
