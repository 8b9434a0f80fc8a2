"""Energy-based loss terms against known answers: at the target the path gradient of the reverse KL vanishes
while the plain one does not; the importance-weighted forward KL with exact weights is the NLL of the samples."""

import copy

import pytest
import torch

from bg.models import SplitChannelNSF


@pytest.fixture(scope="module")
def model_at_its_target(aldp_system, aldp_frames, tiny_nsf_kwargs):
    """A tiny NSF whose target energy is its own (frozen) −log q: q equals the target exactly."""
    torch.manual_seed(0)
    model = SplitChannelNSF(**{**tiny_nsf_kwargs, "kl_batch_size": 64})
    model.build(aldp_system, torch.as_tensor(aldp_frames[:100], dtype=torch.float32))
    # a few ML steps so that the flow is not the identity-like initialisation
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.as_tensor(aldp_frames[:100], dtype=torch.float32)
    for _ in range(20):
        opt.zero_grad()
        model.term_nll(x).backward()
        opt.step()
    frozen = copy.deepcopy(model.density).requires_grad_(False)
    model.target = lambda xs: -frozen.log_prob(xs)
    return model


def _grad(model, value):
    grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    return torch.cat([g.flatten() for g in grads if g is not None])


def test_path_gradient_vanishes_at_the_target(model_at_its_target):
    model = model_at_its_target
    torch.manual_seed(1)
    plain = model.term_kl(None)
    g_plain = _grad(model, plain)
    torch.manual_seed(1)
    path = model.term_kl_path(None)
    g_path = _grad(model, path)
    # same samples, same value (E[u + log q] = 0 here), up to the float32 round trip of log q
    assert float(path.detach()) == pytest.approx(float(plain.detach()), abs=1e-4)
    assert abs(float(plain.detach())) < 1e-3
    assert g_plain.norm() > 1e-2  # the score term: zero mean, not zero
    assert g_path.norm() < 1e-4 * g_plain.norm()


def test_path_gradient_estimates_the_reverse_kl_gradient_away_from_the_target(aldp_system, aldp_frames,
                                                                               tiny_nsf_kwargs):
    torch.manual_seed(0)
    model = SplitChannelNSF(**{**tiny_nsf_kwargs, "kl_batch_size": 256})
    model.build(aldp_system, torch.as_tensor(aldp_frames[:100], dtype=torch.float32))
    torch.manual_seed(2)
    g_plain = _grad(model, model.term_kl(None))
    torch.manual_seed(2)
    g_path = _grad(model, model.term_kl_path(None))
    # far from the target the energy dominates both estimators: they point the same way
    assert torch.nn.functional.cosine_similarity(g_plain, g_path, dim=0) > 0.95


def test_importance_weighted_forward_kl_with_exact_weights_is_the_samples_nll(model_at_its_target):
    model = model_at_its_target
    before = model.energy_evaluations
    torch.manual_seed(3)
    value = model.term_fkl_is(None)
    torch.manual_seed(3)
    xs, log_q = model.density.sample(model.hparams.kl_batch_size)
    assert float(value) == pytest.approx(float(-log_q.mean()), rel=1e-5)
    assert model.energy_evaluations - before == model.hparams.kl_batch_size


def test_mcmc_refined_nll_without_steps_is_the_nll_of_the_flows_samples(model_at_its_target):
    model = model_at_its_target
    model.hparams.mcmc_steps = 0
    torch.manual_seed(4)
    value = model.term_nll_mcmc(None)
    torch.manual_seed(4)
    _, log_q = model.density.sample(model.hparams.kl_batch_size)
    assert float(value.detach()) == pytest.approx(float(-log_q.mean()), rel=1e-5)


def test_mcmc_refinement_keeps_the_target_and_counts_its_energy_evaluations(model_at_its_target):
    """At the target (q = p) the Metropolis-adjusted steps leave q invariant: the refined samples' NLL
    matches the unrefined one within its standard error; every step evaluates the energy once per sample."""
    model = model_at_its_target
    model.hparams.mcmc_steps, model.hparams.mcmc_step_size = 5, 1e-6
    before = model.energy_evaluations
    torch.manual_seed(5)
    refined = float(model.term_nll_mcmc(None).detach())
    n = model.hparams.kl_batch_size
    assert model.energy_evaluations - before == n * 6
    torch.manual_seed(6)
    _, log_q = model.density.sample(n)
    assert refined == pytest.approx(float(-log_q.mean()), abs=4 * float(log_q.std()) / n**0.5)


def test_log_variance_vanishes_with_its_gradient_at_the_target(model_at_its_target, aldp_frames):
    """q = p: log w is the same constant on flow samples and on data frames, so the term and its gradient are
    zero (the reverse KL's score-function gradient is not: it is only zero in expectation)."""
    model = model_at_its_target
    data = torch.as_tensor(aldp_frames[100:164], dtype=torch.float32)
    before = model.energy_evaluations
    torch.manual_seed(7)
    value = model.term_logvar(data)
    assert abs(float(value.detach())) < 1e-8
    assert _grad(model, value).norm() < 1e-4
    assert model.energy_evaluations - before == model.hparams.kl_batch_size + len(data)


def test_log_variance_ignores_the_unknown_normalising_constant(aldp_system, aldp_frames, tiny_nsf_kwargs):
    """Away from the target, u → u + c (the log partition function nobody knows) changes neither the term
    nor its gradient; the data frames contribute to both."""
    torch.manual_seed(0)
    model = SplitChannelNSF(**{**tiny_nsf_kwargs, "kl_batch_size": 64})
    model.build(aldp_system, torch.as_tensor(aldp_frames[:100], dtype=torch.float32))
    # target: the untrained flow (energies of a few tens of kT: linlog_cut, which is not shift-invariant, stays
    # linear); q: the flow after a few ML steps
    frozen = copy.deepcopy(model.density).requires_grad_(False)
    energy = lambda xs: -frozen.log_prob(xs)  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):
        opt.zero_grad()
        model.term_nll(torch.as_tensor(aldp_frames[:100], dtype=torch.float32)).backward()
        opt.step()
    data = torch.as_tensor(aldp_frames[100:164], dtype=torch.float32)
    values, grads = [], []
    for shift, frames in ((0.0, data), (123.0, data), (0.0, data[:0])):
        model.target = lambda xs, shift=shift: energy(xs) + shift
        torch.manual_seed(8)
        value = model.term_logvar(frames)
        values.append(float(value.detach()))
        grads.append(_grad(model, value))
    assert values[0] > 0
    assert values[1] == pytest.approx(values[0], rel=1e-6)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6 * float(grads[0].abs().max()))
    assert values[2] != pytest.approx(values[0], rel=1e-3)


def _trained_a_little(aldp_system, aldp_frames, tiny_nsf_kwargs, steps: int = 10):
    """A tiny NSF after a few ML steps and, as its target, the untrained flow (−log q₀): weights spread by a
    few nats, energies small enough that linlog_cut stays linear."""
    torch.manual_seed(0)
    model = SplitChannelNSF(**{**tiny_nsf_kwargs, "kl_batch_size": 64})
    model.build(aldp_system, torch.as_tensor(aldp_frames[:100], dtype=torch.float32))
    frozen = copy.deepcopy(model.density).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        model.term_nll(torch.as_tensor(aldp_frames[:100], dtype=torch.float32)).backward()
        opt.step()
    model.target = lambda xs: -frozen.log_prob(xs)
    return model, frozen


def test_alpha2_reports_the_batch_ess_and_ignores_the_normalising_constant(aldp_system, aldp_frames,
                                                                           tiny_nsf_kwargs):
    """The α = 2 term's value is −log(ESS/n) of its flow samples (Kish, computed here from the target and the
    sampling log q); shifting u by a constant changes neither value nor gradient; its gradient is
    −Σ w̄² ∇ log q, which for equal weights would be the plain score mean."""
    from bg.sampling.ess import kish_ess

    model, frozen = _trained_a_little(aldp_system, aldp_frames, tiny_nsf_kwargs)
    data = torch.as_tensor(aldp_frames[100:132], dtype=torch.float32)
    energy = model.target
    values, grads = [], []
    for shift in (0.0, 57.0):
        model.target = lambda xs, shift=shift: energy(xs) + shift
        torch.manual_seed(9)
        value = model.term_alpha2(data)
        values.append(float(value.detach()))
        grads.append(_grad(model, value))
    torch.manual_seed(9)
    xs, log_q = model.density.sample(model.hparams.kl_batch_size)
    ess = float(kish_ess(frozen.log_prob(xs) - log_q))
    assert 0.05 < ess < 0.99  # the weights are spread: a real test of the value
    assert values[0] == pytest.approx(-torch.log(torch.tensor(ess)).item(), abs=2e-4)
    assert values[1] == pytest.approx(values[0], abs=1e-6)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6 * float(grads[0].abs().max()))
    # the gradient weights the samples by w² (normalised), not uniformly or by w
    log_w = (frozen.log_prob(xs) - log_q).detach()
    for power, should_match in ((2, True), (1, False)):
        weights = torch.softmax(power * log_w, 0)
        g = _grad(model, -(weights * model.density.log_prob(xs)).sum())
        assert torch.allclose(g, grads[0], rtol=1e-3, atol=1e-4 * float(g.abs().max())) is should_match


def test_logvar_and_alpha2_share_one_set_of_flow_samples_in_a_training_step(aldp_system, aldp_frames,
                                                                             tiny_nsf_kwargs):
    """Within a training step the two terms draw and evaluate the flow's samples once (energy evaluations:
    kl_batch_size + the batch), and their losses add up to what each gives alone on the same samples."""
    model, _ = _trained_a_little(aldp_system, aldp_frames, tiny_nsf_kwargs, steps=3)
    data = torch.as_tensor(aldp_frames[100:132], dtype=torch.float32)
    parts = {}
    for term in ("logvar", "alpha2"):
        torch.manual_seed(11)
        parts[term] = float(getattr(model, f"term_{term}")(data).detach())
    model.loss_weights = {"logvar": 1.0, "alpha2": 0.5}
    before = model.energy_evaluations
    torch.manual_seed(11)
    loss, _ = model.weighted_loss(data)
    assert model.energy_evaluations - before == model.hparams.kl_batch_size + len(data)
    assert float(loss) == pytest.approx(parts["logvar"] + 0.5 * parts["alpha2"], rel=1e-5)
    assert model._step_cache is None


def test_bench_speed_options_keep_a_checkpoint_loadable(tiny_nsf_kwargs):
    """bench/energy_stages.py records the NSF's speed options in its hparams, and leaves other families' hparams
    alone: a TarFlow saved with a `compile_splines` entry could not be loaded again (its init has no such option)."""
    from bench.energy_stages import speed_options
    from bg.models import TarFlowGenerator
    from tests.test_tarflow_model import TINY

    tarflow = TarFlowGenerator(**TINY)
    before = dict(tarflow.hparams)
    speed_options(tarflow, None, False)
    assert dict(tarflow.hparams) == before
    TarFlowGenerator(**tarflow.hparams)  # the hparams are still its own init arguments

    nsf = SplitChannelNSF(**tiny_nsf_kwargs)
    speed_options(nsf, "bfloat16", True)
    assert nsf.hparams.conditioner_precision == "bfloat16" and nsf.hparams.compile_splines
    SplitChannelNSF(**nsf.hparams)


def test_data_log_weights_of_a_reduced_model_ignore_its_frozen_coordinates(aldp_system, aldp_frames, tiny_nsf_kwargs):
    """With reduced internal coordinates, a data frame's log w (logvar, alpha2) is that of the frame on the model's
    coordinates: stretching a frozen side-chain bond changes neither its u nor its log q, so the divergence does
    not chase the frozen coordinates' MD energy; a free (backbone) change does move it."""
    from bg.coordinates.internal import InternalCoordinates

    torch.manual_seed(0)
    model = SplitChannelNSF(**{**tiny_nsf_kwargs, "reduced": True, "kl_batch_size": 8})
    model.build(aldp_system, torch.as_tensor(aldp_frames[:100], dtype=torch.float32))
    rep = model.density.representation
    x = torch.as_tensor(aldp_frames[100:104], dtype=torch.float64)
    full = InternalCoordinates(aldp_system.topology)
    z, _ = full(x)
    frozen_bond = int((~rep._free[:full.n_bonds]).nonzero()[0])
    free_bond = int(rep._free[:full.n_bonds].nonzero()[0])
    logs = []
    for k in (None, frozen_bond, free_bond):
        zk = z.clone()
        if k is not None:
            zk[:, k] += 0.03  # nm
        xk = full.inverse(zk)[0]
        torch.manual_seed(5)  # the same flow samples each time
        n, log_w = model._own_samples_and_data(xk.float())
        logs.append(log_w[n:].detach())
    torch.testing.assert_close(logs[1], logs[0], atol=1e-3, rtol=0)
    assert (logs[2] - logs[0]).abs().mean() > 1.0


def test_stage_bench_readings_are_those_of_its_samples(aldp_system, aldp_frames, tiny_nsf_kwargs):
    """bench/energy_stages.py's readings (what moves on a protein while ESS/n sits at 1/n) against mdtraj and the
    energies of the same samples drawn again: ΔD of heavy backbone distances, energy quantiles, the log-weight
    spread and the raw φ > 0 fraction."""
    import itertools

    import mdtraj as md
    import numpy as np

    from bench.energy_stages import distortion_reader, ess
    from bg.analysis import BACKBONE_HEAVY, phi_psi

    torch.manual_seed(0)
    model = SplitChannelNSF(**tiny_nsf_kwargs)
    model.build(aldp_system, torch.as_tensor(aldp_frames[:100], dtype=torch.float32))
    reference = torch.as_tensor(aldp_frames[100:])
    readings = {k: [] for k in ("phi_positive", "energies", "log_w_sd", "distortion")}
    e = ess(model, 200, seed=5, readings=readings, distortion=distortion_reader(model, reference))

    torch.manual_seed(5)
    model.eval()
    with torch.no_grad():
        out = model.proposal.weigh(200, model.energy)
    top = aldp_system.topology
    heavy = [a.index for a in top.atoms if a.name in BACKBONE_HEAVY and a.element.symbol != "H"]
    pairs = list(itertools.combinations(heavy, 2))
    d_gen = md.compute_distances(md.Trajectory(out["x"].numpy(), top), pairs).astype(np.float64)
    d_ref = md.compute_distances(md.Trajectory(reference.numpy(), top), pairs).astype(np.float64)
    assert readings["distortion"][0] == pytest.approx(np.abs(d_gen.mean(0) - d_ref.mean(0)).mean(), abs=1e-4)

    u = out["energy_kT"].double().numpy()
    assert readings["energies"][0] == pytest.approx([np.quantile(u, 0.05), np.quantile(u, 0.5)], rel=1e-9)
    log_w = out["log_w"].double().numpy()
    iqr = np.subtract(*np.quantile(log_w, [0.75, 0.25]))
    assert readings["log_w_sd"][0] == pytest.approx(iqr / 1.349, abs=0.01)
    phi, _ = phi_psi(out["x"], top)
    assert readings["phi_positive"][0] == pytest.approx(float((phi > 0).double().mean()), abs=1e-4)
    w = np.exp(log_w - log_w.max())
    assert e == pytest.approx(w.sum() ** 2 / (w ** 2).sum() / len(w), rel=1e-6)


def test_weight_spread_terms_are_openmm_force_groups(aldp_system, aldp_frames, tiny_nsf_kwargs):
    """bench/log_weight_spread.py --terms: each force-field term over the flow's samples and over the MD frames on
    the model's coordinates, against OpenMM's Reference platform force by force (one force group each) on the same
    samples drawn again, and its correlation with log w over the samples without clashes."""
    import numpy as np

    from bench.log_weight_spread import spread
    from bg.systems.system import kT_kJ_per_mol
    from tests.test_torch_energy import reference

    torch.manual_seed(0)
    model = SplitChannelNSF(**{**tiny_nsf_kwargs, "reduced": True})  # frozen coordinates: frames differ on the model
    model.build(aldp_system, torch.as_tensor(aldp_frames[:100], dtype=torch.float32))
    frames = torch.as_tensor(aldp_frames[100:160])
    s = spread(model, frames, 300, seed=3, terms=True, clash_nats=50.0)

    torch.manual_seed(3)
    model.eval()
    with torch.no_grad():
        out = model.proposal.weigh(300, model.energy)
        on_model = model.on_model_coordinates(frames.double())
    assert (on_model - frames).abs().max() > 1e-3
    omm = aldp_system.create_openmm_system()
    kinds = {k: type(f).__name__ for k, f in enumerate(omm.getForces()) if type(f).__name__ != "CMMotionRemover"}
    kT = kT_kJ_per_mol(aldp_system.temperature)
    per_sample = reference(omm, out["x"].double().numpy())[0] / kT
    per_frame = reference(omm, on_model.numpy())[0] / kT
    log_w = out["log_w"].double().numpy()
    kept = np.isfinite(log_w) & (log_w > np.median(log_w) - 50.0)
    assert s["kept"] == int(kept.sum()) and 0 < s["kept"] < 300  # the untrained flow clashes in some samples

    def robust(v):
        q25, q50, q75 = np.quantile(v, [0.25, 0.5, 0.75])
        return q50, (q75 - q25) / 1.349

    names = list(s["terms"])
    assert [name.split("[")[0] for name in names[:-1]] == list(kinds.values())
    nonbonded = [k for k, kind in kinds.items() if kind in ("NonbondedForce", "CustomGBForce", "GBSAOBCForce")]
    assert len(nonbonded) == 2
    assert names[-1] == " + ".join(names[i] for i, k in enumerate(kinds) if k in nonbonded)
    per_sample = np.concatenate([per_sample, per_sample[:, nonbonded].sum(1, keepdims=True)], 1)
    per_frame = np.concatenate([per_frame, per_frame[:, nonbonded].sum(1, keepdims=True)], 1)
    for (name, (sample_stats, frame_stats, corr)), k in zip(s["terms"].items(), [*kinds, per_sample.shape[1] - 1]):
        scale = max(1.0, abs(np.median(per_sample[:, k])))
        np.testing.assert_allclose(sample_stats, robust(per_sample[:, k]), rtol=1e-5, atol=1e-6 * scale, err_msg=name)
        np.testing.assert_allclose(frame_stats, robust(per_frame[:, k]), rtol=1e-5, atol=1e-6, err_msg=name)
        assert corr == pytest.approx(np.corrcoef(per_sample[kept, k], log_w[kept])[0, 1], abs=1e-4), name
