"""Base densities of the continuous flow: the harmonic prior against an independent Gaussian on the mean-free
subspace, its sampling and maximum-likelihood width, and the isotropic prior as it always was."""

import math

import pytest
import torch

from bg.coordinates import centred
from bg.flows import EGNN, ContinuousFlow, ODESolver
from bg.flows.mean_free_priors import HarmonicPrior, IsotropicPrior
from bg.systems.encodings import ENCODING_VOCAB

# a branched 6-atom tree and a 5-ring with a tail (a cycle: effective resistances below 1)
TREE = torch.tensor([[0, 1], [1, 2], [1, 3], [3, 4], [3, 5]])
RING = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4], [4, 0], [4, 5]])


def laplacian(bonds: torch.Tensor, n: int) -> torch.Tensor:
    lap = torch.zeros(n, n, dtype=torch.float64)
    for i, j in bonds.tolist():
        lap[i, i] += 1
        lap[j, j] += 1
        lap[i, j] -= 1
        lap[j, i] -= 1
    return lap


def subspace_reference(bonds: torch.Tensor, n: int, alpha: float, x: torch.Tensor) -> torch.Tensor:
    """log N(c; 0, (α QᵀLQ)⁻¹) summed over the three axes, c = Qᵀx_d, Q an orthonormal basis of the mean-free
    subspace from a QR decomposition (not the Laplacian's eigenvectors)."""
    lap = laplacian(bonds, n)
    centring = torch.eye(n, dtype=torch.float64) - 1.0 / n
    q, _ = torch.linalg.qr(centring[:, : n - 1])
    precision = alpha * q.T @ lap @ q
    gauss = torch.distributions.MultivariateNormal(torch.zeros(n - 1, dtype=torch.float64), precision_matrix=precision)
    c = torch.einsum("ik,bid->bdk", q, x)  # (B, 3, N − 1)
    return gauss.log_prob(c).sum(-1)


@pytest.mark.parametrize("bonds", [TREE, RING], ids=["tree", "ring"])
def test_harmonic_log_prob_is_the_gaussian_on_the_mean_free_subspace(bonds):
    prior = HarmonicPrior(6, bonds)
    prior.alpha.fill_(2.7)
    x = centred(torch.randn(5, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(prior.log_prob(x), subspace_reference(bonds, 6, 2.7, x), atol=1e-10, rtol=1e-12)
    # rotation and translation (the mean is outside the subspace) do not change it
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(prior.log_prob(x @ q.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)),
                               prior.log_prob(x), atol=1e-10, rtol=1e-12)


@pytest.mark.parametrize("bonds", [TREE, RING], ids=["tree", "ring"])
def test_harmonic_samples_have_the_bond_statistics_and_fit_recovers_alpha(bonds):
    prior = HarmonicPrior(6, bonds)
    prior.alpha.fill_(4.0)
    x = prior.sample(40_000, torch.float64, generator=torch.Generator().manual_seed(2))
    assert x.mean(1).abs().max() < 1e-12  # mean-free
    # E|x_i − x_j|² = 3 R_ij / α with R the effective resistance (the Laplacian's pseudo-inverse)
    lap_pinv = torch.linalg.pinv(laplacian(bonds, 6))
    for i, j in bonds.tolist():
        resistance = lap_pinv[i, i] + lap_pinv[j, j] - 2 * lap_pinv[i, j]
        measured = (x[:, i] - x[:, j]).square().sum(-1).mean()
        assert float(measured) == pytest.approx(3 * float(resistance) / 4.0, rel=0.03)
    fitted = HarmonicPrior(6, bonds).fit(x)
    assert float(fitted.alpha) == pytest.approx(4.0, rel=0.02)


def test_harmonic_prior_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 connected components"):
        HarmonicPrior(6, torch.tensor([[0, 1], [1, 2], [3, 4], [4, 5]]))
    with pytest.raises(ValueError, match=r"bond indices must lie in \[0, 6\)"):
        HarmonicPrior(6, torch.tensor([[0, 6]]))


def test_isotropic_prior_is_the_standard_gaussian_as_before():
    prior = IsotropicPrior(6)
    x = prior.sample(3, torch.float64, generator=torch.Generator().manual_seed(4))
    expected = centred(torch.randn(3, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(prior.log_prob(x), -0.5 * x.square().sum((1, 2)) - 7.5 * math.log(2 * math.pi))


def test_a_flow_with_the_harmonic_prior_solves_back_to_its_samples_density():
    tokens = torch.tensor([[6], [1], [1], [6], [8], [7]])
    torch.manual_seed(5)
    field = EGNN(tokens, ENCODING_VOCAB["element"], hidden=12, layers=2, coord_hidden=True).double()
    with torch.no_grad():
        for layer in field.layers:
            layer.coord[-1].weight.normal_(0, 0.5)
    prior = HarmonicPrior(6, TREE)
    flow = ContinuousFlow(field, 6, ODESolver("dopri5", rtol=1e-9, atol=1e-9), prior)
    data = prior.sample(256, torch.float64, generator=torch.Generator().manual_seed(6)) * 0.5
    flow.fit(data + 3.0)  # fit centres the frames: α of the data, whatever their mean
    assert float(prior.alpha) == pytest.approx(4.0 * float(HarmonicPrior(6, TREE).fit(data * 2).alpha), rel=1e-9)
    x1, log_q = flow.sample(4)
    torch.testing.assert_close(flow.log_prob(x1), log_q, atol=1e-6, rtol=1e-6)
    x0 = flow.prior_sample(4, torch.float64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(flow.prior_log_prob(x0), subspace_reference(TREE, 6, float(prior.alpha), x0),
                               atol=1e-10, rtol=1e-12)
