import pytest
import torch

from bg.coordinates import InternalCoordinates
from bg.flows import GAUConditioner, MLPConditioner, SplitChannelFlow
from bg.flows.conditioners import coordinate_features


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

    def conditioner(n_params: int, slot: int):
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


def _internal_flow(ic, narrow_torsions="bounded"):
    from bg.flows import neural_spline_flow

    torch.manual_seed(0)
    kinds = ic.is_angle.long() + 2 * ic.is_torsion.long()
    return neural_spline_flow(kinds, ic.residue_index, ic.is_backbone, conditioner="mlp", backbone_layers=2,
                              sidechain_layers=2, bins=6, width=32, depth=1,
                              narrow_torsions=narrow_torsions).double()


def test_narrow_torsions_are_recentred_bounded_coordinates(aldp_z):
    """Torsions within 45° of their mean (sibling-relative dihedrals, planar groups at ±π) become bounded
    coordinates on a shifted axis; wide ones (φ, ψ, methyl rotors) stay circular; the map stays exact."""
    ic, z = aldp_z
    # a planar torsion that straddles ±π in the data must still be recognised as narrow (wrapping)
    z = z.clone()
    j = int(torch.nonzero(ic.is_torsion)[-1])
    z[:, j] = torch.remainder(torch.pi + 0.05 * torch.randn(len(z), dtype=z.dtype) + torch.pi, 2 * torch.pi) - torch.pi
    assert (z[:, j] > 3.0).any() and (z[:, j] < -3.0).any()
    flow = _internal_flow(ic).fit(z)
    phi, psi = ic.phi_psi_indices()
    assert flow.recentred[j] and not flow.recentred[phi] and not flow.recentred[psi]
    assert not flow.recentred[~ic.is_torsion].any()
    assert int(flow.recentred.sum()) >= 8  # 6 methyl-hydrogen siblings, CB/HA at CA, ... of alanine dipeptide
    coupling = flow.transform.layers[0]
    assert torch.equal(coupling.circular, ic.is_torsion & ~flow.recentred)
    assert (flow.base.high[j] - flow.base.low[j]) < 1.0  # an interval around 0 after the shift, not the circle
    randomize(flow)
    zs, log_q = flow.sample(500)
    assert (zs[:, j].abs() > 2.5).all()  # samples around ±π, on both sides of the cut
    torch.testing.assert_close(flow.log_prob(zs), log_q, atol=1e-8, rtol=0)
    # the density of the data is unchanged by the wrapping: the shift has Jacobian 1
    assert torch.isfinite(flow.log_prob(z[:50])).all()


def test_all_circular_torsions_and_old_state_dicts(aldp_z):
    ic, z = aldp_z
    flow = _internal_flow(ic, "circular").fit(z)
    assert not flow.recentred.any()
    assert torch.equal(flow.transform.layers[0].circular, ic.is_torsion)
    # a state dict written before the recentring existed loads as all-circular
    state = {k: v for k, v in flow.state_dict().items() if k not in ("recentred", "centre")}
    fresh = _internal_flow(ic)
    fresh.load_state_dict(state)
    assert not fresh.recentred.any()
    torch.testing.assert_close(fresh.log_prob(z[:20]), flow.log_prob(z[:20]))


def test_shuffled_masks_partition_each_pair_differently(aldp_z):
    ic, z = aldp_z
    kinds = ic.is_angle.long() + 2 * ic.is_torsion.long()
    flow = SplitChannelFlow(ic.is_backbone, ic.is_torsion, z.min(0).values - 0.1, z.max(0).values + 0.1,
                            lambda n, slot: MLPConditioner(ic.dim, n, hidden=16, depth=1), backbone_layers=6,
                            sidechain_layers=2, bins=4, masks="shuffled").double()
    backbone = [layer for layer in flow.layers if (layer.transform & ic.is_backbone).any()]
    pairs = [(a.transform, b.transform) for a, b in zip(backbone[0::2], backbone[1::2])]
    for a, b in pairs:  # each pair transforms every backbone coordinate exactly once
        assert not (a & b).any() and torch.equal(a | b, ic.is_backbone)
    assert len({tuple(a.tolist()) for a, _ in pairs}) == len(pairs)  # a fresh split per pair
    # the same split on every construction (a checkpoint rebuilds the same flow)
    again = SplitChannelFlow(ic.is_backbone, ic.is_torsion, z.min(0).values - 0.1, z.max(0).values + 0.1,
                             lambda n, slot: MLPConditioner(ic.dim, n, hidden=16, depth=1), backbone_layers=6,
                             sidechain_layers=2, bins=4, masks="shuffled")
    assert all(torch.equal(a.transform, b.transform) for a, b in zip(flow.layers, again.layers))
    randomize(flow)
    u, ld = flow(z[:20])
    zr, ld_inv = flow.inverse(u)
    assert (zr - z[:20]).abs().max() < 1e-8 and (ld + ld_inv).abs().max() < 1e-8


def test_a_coupling_applies_circular_splines_to_torsions_and_bounded_ones_to_the_rest(aldp_z):
    """Each transformed coordinate against the spline functions applied one by one: torsions through
    ``circular_rq_spline`` on [−π, π) (whatever interval the coupling holds for them), bonds and angles through
    ``rq_spline`` on their interval; untouched coordinates pass through; the log-det is the sum."""
    import math

    from bg.flows import circular_rq_spline, rq_spline

    ic, z = aldp_z
    flow = make_flow(ic, z, "mlp", seed=2)
    randomize(flow)
    layer = flow.layers[0]
    x = z[:16]
    with torch.no_grad():
        params = layer.conditioner(coordinate_features(x, ~layer.condition, layer.circular, layer.low, layer.high))
        y, ld = layer(x)
    k, expected, total = layer.bins, x.clone(), torch.zeros(len(x), dtype=x.dtype)
    for i in torch.nonzero(layer.transform).flatten().tolist():
        w, h, d = params[:, i, :k], params[:, i, k : 2 * k], params[:, i, 2 * k :]
        if layer.circular[i]:
            yi, li = circular_rq_spline(x[:, i], w, h, d[:, :k])
        else:
            lo, hi = float(layer.low[i]), float(layer.high[i])
            yi, li = rq_spline(x[:, i], w, h, d, low=lo, high=hi)
        expected[:, i], total = yi, total + li
    assert layer.circular[layer.transform].any() and (~layer.circular[layer.transform]).any()
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ld, total, atol=1e-10, rtol=1e-10)
    assert float(y[:, layer.circular].min()) >= -math.pi and float(y[:, layer.circular].max()) < math.pi


@pytest.mark.parametrize("kind,tokens", [("mlp", None), ("gau", "residue"), ("gau", "coordinate")])
def test_a_conditioner_asked_for_some_rows_gives_those_rows_of_its_full_output(aldp_z, kind, tokens):
    ic, z = aldp_z
    kinds = ic.is_angle.long() + 2 * ic.is_torsion.long()
    torch.manual_seed(3)
    if kind == "mlp":
        conditioner = MLPConditioner(ic.dim, 7, hidden=32, depth=1).double()
    else:
        conditioner = GAUConditioner(kinds, ic.residue_index, 7, width=16, depth=1, attention_dim=8,
                                     tokens=tokens).double()
    randomize(conditioner)  # the output layer starts at zero
    mask = torch.rand(ic.dim) < 0.5
    features = coordinate_features(z[:12], mask, ic.is_torsion, z.min(0).values - 1, z.max(0).values + 1)
    rows = torch.nonzero(mask).flatten()[torch.randperm(int(mask.sum()))]  # any order
    full = conditioner(features)
    torch.testing.assert_close(conditioner(features, rows), full[:, rows], atol=1e-12, rtol=0)
    torch.testing.assert_close(conditioner(features, rows[:3]), full[:, rows[:3]], atol=1e-12, rtol=0)  # new rows
    assert conditioner(features, rows).shape == (12, len(rows), 7)


@pytest.mark.parametrize("kind", ["mlp", "gau"])
def test_bfloat16_conditioners_train_in_bfloat16_and_evaluate_in_float32(aldp_z, kind):
    ic, z = aldp_z
    kinds = ic.is_angle.long() + 2 * ic.is_torsion.long()

    def build(precision):
        torch.manual_seed(4)
        if kind == "mlp":
            return MLPConditioner(ic.dim, 7, hidden=32, depth=1, precision=precision)
        return GAUConditioner(kinds, ic.residue_index, 7, width=32, depth=1, attention_dim=8, precision=precision)

    exact, low = build("float32"), build("bfloat16")
    randomize(exact)
    low.load_state_dict(exact.state_dict())
    mask = torch.rand(ic.dim) < 0.5
    features = coordinate_features(z[:64].float(), mask, ic.is_torsion, (z.min(0).values - 1).float(),
                                   (z.max(0).values + 1).float())
    reference = exact(features)
    trained = low.train()(features)
    assert trained.dtype == torch.float32
    error = (trained - reference).abs().max() / reference.abs().max()
    assert 1e-5 < error < 3e-2  # bfloat16 rounding (8 bits of mantissa), not float32's
    trained.sum().backward()  # gradients reach the float32 weights
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in low.parameters() if p.requires_grad)
    torch.testing.assert_close(low.eval()(features), reference, atol=0, rtol=0)
    with pytest.raises(ValueError, match="precision"):
        build("float16")


def test_compiled_splines_give_the_eager_couplings_results(aldp_z):
    ic, z = aldp_z
    eager = make_flow(ic, z, "gau", seed=5)
    randomize(eager)
    compiled = make_flow(ic, z, "gau", seed=5)
    compiled.load_state_dict(eager.state_dict())
    for layer in compiled.layers:
        layer.compile_spline = True
    with torch.no_grad():
        u, ld = eager(z[:32])
        uc, ldc = compiled(z[:32])
        zr, ldr = compiled.inverse(uc)
    torch.testing.assert_close(uc, u, atol=1e-10, rtol=0)
    torch.testing.assert_close(ldc, ld, atol=1e-10, rtol=0)
    assert (zr - z[:32]).abs().max() < 1e-8 and (ldr + ldc).abs().max() < 1e-8


def test_compiled_splines_without_a_compiler_say_which_option_needs_one(monkeypatch):
    from torch._inductor import config as inductor_config

    from bg.flows.splines import compiled_rq_spline

    compiled_rq_spline.cache_clear()
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-compiler-bg-test",))
    try:
        with pytest.raises(RuntimeError, match=r"compile_splines: true needs a C\+\+ compiler.*no-such-compiler-bg-test"):
            compiled_rq_spline()
    finally:
        compiled_rq_spline.cache_clear()
