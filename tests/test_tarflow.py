"""TarFlow: identity at initialisation, exact inverse, log-det against autograd, causality."""

import pytest
import torch

from bg.flows import TarFlow, TarFlowBlock


def _randomised(flow: TarFlow, scale: float = 0.1) -> TarFlow:
    # The output projection starts at zero (identity); give it weights so the tests test something.
    # std 0.1 moves tokens by up to ~25 here; at 0.3 (moves of ~3000) the sequential inverse amplifies
    # rounding exponentially along the tokens, as for any badly conditioned autoregressive map.
    torch.manual_seed(1)
    for block in flow.blocks:
        torch.nn.init.normal_(block.out.weight, std=scale)
        torch.nn.init.normal_(block.out.bias, std=scale)
    return flow


def test_untrained_flow_is_the_identity():
    flow = TarFlow(n_tokens=6, token_dim=3, channels=16, blocks=2, layers=1, heads=2)
    x = torch.randn(4, 6, 3)
    z, log_det = flow(x)
    assert torch.equal(z, x) and torch.equal(log_det, torch.zeros(4))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_inverse_of_forward_is_the_identity(dtype, tol):
    flow = _randomised(TarFlow(n_tokens=22, token_dim=3, channels=32, blocks=4, layers=2, heads=4)).to(dtype)
    x = torch.randn(8, 22, 3, dtype=dtype)
    with torch.no_grad():
        z, ld_fwd = flow(x)
        x_back, ld_inv = flow.inverse(z)
    assert (x_back - x).abs().max() < tol
    assert (ld_fwd + ld_inv).abs().max() < tol * 100
    assert (z - x).abs().max() > 0.1  # not the identity any more


def test_log_det_equals_autograd_and_sampling_is_consistent():
    flow = _randomised(TarFlow(n_tokens=5, token_dim=3, channels=16, blocks=3, layers=1, heads=2)).double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    _, log_det = flow(x)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 5, 3))[0].flatten(), x[i].flatten())
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)
    samples, log_q = flow.sample(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flow.log_prob(samples), log_q, rtol=0, atol=1e-9)


@pytest.mark.parametrize("reverse", [False, True])
def test_token_i_depends_only_on_earlier_tokens_in_block_order(reverse):
    block = TarFlowBlock(n_tokens=6, token_dim=2, channels=16, layers=1, heads=2, reverse=reverse).double()
    torch.nn.init.normal_(block.out.weight, std=0.3)
    x = torch.randn(1, 6, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: block(v.view(1, 6, 2))[0].flatten(), x.flatten())
    per_token = jac.view(6, 2, 6, 2).abs().sum((1, 3))  # |∂z_i/∂x_j| summed over coordinates
    order = list(range(6))[::-1] if reverse else list(range(6))
    for a, i in enumerate(order):
        for j in order[a + 1:]:
            assert per_token[i, j] == 0, f"z_{i} depends on the later token x_{j}"
    assert per_token[order[-1], order[0]] > 0  # and does depend on earlier ones


def _naive_inverse(block: TarFlowBlock, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse without a cache: the whole prefix through the block for every token (the definition)."""
    z = z.flip(1) if block.reverse else z
    xs, log_det = [], z.new_zeros(len(z))
    for i in range(z.shape[1]):
        a, b = block._params(torch.stack(xs, 1) if xs else z[:, :0])
        xs.append(z[:, i] * torch.exp(a[:, i]) + b[:, i])
        log_det = log_det + a[:, i].sum(-1)
    x = torch.stack(xs, 1)
    return (x.flip(1) if block.reverse else x), log_det


@pytest.mark.parametrize("reverse", [False, True])
def test_cached_inverse_equals_the_definition_with_its_gradients(reverse):
    """The KV-cached inverse gives the naive inverse's samples, log-determinants and parameter gradients
    (reverse KL back-propagates through it)."""
    torch.manual_seed(2)
    block = TarFlowBlock(n_tokens=7, token_dim=3, channels=16, layers=2, heads=4, reverse=reverse).double()
    torch.nn.init.normal_(block.out.weight, std=0.1)
    torch.nn.init.normal_(block.out.bias, std=0.1)
    z = torch.randn(5, 7, 3, dtype=torch.float64)
    grads = []
    for inverse in (block.inverse, lambda v: _naive_inverse(block, v)):
        block.zero_grad()
        x, log_det = inverse(z)
        (x.sin().sum() + log_det.sum()).backward()
        grads.append((x.detach(), log_det.detach(), [p.grad.clone() for p in block.parameters()]))
    (x1, ld1, g1), (x2, ld2, g2) = grads
    assert (x1 - z).abs().max() > 0.05 and sum(bool(g.abs().max() > 0) for g in g1) == len(g1)  # not vacuous
    torch.testing.assert_close(x1, x2, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld1, ld2, rtol=0, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
