import pytest
import torch

from bg.coordinates import InternalCoordinates
from bg.flows import GAUConditioner, MLPConditioner, SplitChannelFlow


@pytest.fixture(scope="module")
def aldp_z(aldp_system, aldp_frames):
    ic = InternalCoordinates(aldp_system.topology)
    z, _ = ic(torch.tensor(aldp_frames))
    return ic, z


def make_flow(ic, z, kind: str, seed: int = 0) -> SplitChannelFlow:
    torch.manual_seed(seed)
    lo, hi = z.min(0).values, z.max(0).values
    margin = 0.2 * (hi - lo) + 1e-3
    low, high = lo - margin, hi + margin
    kinds = ic.is_angle.long() + 2 * ic.is_torsion.long()

    def conditioner(n_params: int):
        if kind == "mlp":
            return MLPConditioner(ic.dim, n_params, hidden=64, depth=1)
        return GAUConditioner(kinds, ic.residue_index, n_params, width=32, depth=1, attention_dim=16)

    flow = SplitChannelFlow(ic.is_backbone, ic.is_torsion, low, high, conditioner, backbone_layers=2,
                            sidechain_layers=2, bins=6).double()
    return flow


def randomize(flow):
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("kind", ["mlp", "gau"])
def test_identity_at_initialisation(aldp_z, kind):
    ic, z = aldp_z
    flow = make_flow(ic, z, kind)
    u, ld = flow(z[:10])
    torch.testing.assert_close(u, z[:10], atol=1e-9, rtol=0)
    assert ld.abs().max() < 1e-9


@pytest.mark.parametrize("kind", ["mlp", "gau"])
def test_round_trip_and_log_det_vs_autograd(aldp_z, kind):
    ic, z = aldp_z
    flow = make_flow(ic, z, kind, seed=1)
    randomize(flow)
    u, ld = flow(z[:20])
    assert not torch.allclose(u, z[:20])
    zr, ld_inv = flow.inverse(u)
    assert (zr - z[:20]).abs().max() < 1e-8
    assert (ld + ld_inv).abs().max() < 1e-8
    for frame in z[:2]:
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], frame)
        _, logabs = torch.linalg.slogdet(jac)
        assert abs(logabs.item() - flow(frame[None])[1].item()) < 1e-8


def test_backbone_channel_ignores_side_chain(aldp_z):
    ic, z = aldp_z
    flow = make_flow(ic, z, "gau", seed=2)
    randomize(flow)
    bb = ic.is_backbone
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], z[0])
    # Backbone outputs depend on backbone inputs only; side-chain outputs depend on both.
    assert jac[bb][:, ~bb].abs().max() == 0
    assert jac[~bb][:, bb].abs().max() > 0
    assert flow.layers[0].transform[~bb].sum() == 0


def test_torsions_stay_on_the_circle(aldp_z):
    ic, z = aldp_z
    flow = make_flow(ic, z, "mlp", seed=3)
    randomize(flow)
    u, _ = flow(z)
    t = u[:, ic.is_torsion]
    assert t.min() >= -torch.pi and t.max() < torch.pi
