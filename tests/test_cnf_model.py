"""EquivariantCNF as a generator: densities, reweighting hygiene, samplers; then `bg fit` / `bg predict`
on configs/aldp_cnf.yaml (shrunk)."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import bg
from bg.metrics import kish_ess
from bg.models import EquivariantCNF
from bg.sampling import ImportanceSampler, SMCSampler
from tests.conftest import predicted_folder
from tests.test_nsf_cli import run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "aldp_cnf.yaml"
TINY = dict(hidden=16, layers=2, solver="dopri5", rtol=1e-6, atol=1e-6, sample_batch_size=16, energy_backend="torch")


def fm_loss(model, x, seed=123) -> float:
    """The flow-matching loss over all frames with fixed prior samples, times and noise."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        return float(torch.stack([model.term_flow_matching(x) for _ in range(8)]).mean())


@pytest.fixture(scope="module")
def trained(aldp_system, aldp_frames):
    """A small CNF after 60 flow-matching steps with OT pairing on the short MD."""
    torch.manual_seed(0)
    model = EquivariantCNF(**TINY, pairing="ot", ot_chunk=16)
    x = torch.as_tensor(aldp_frames)
    model.build(aldp_system, x)
    before = fm_loss(model, x)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(60):
        loss = model.term_flow_matching(x[torch.randint(0, len(x), (32,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, (before, fm_loss(model, x))


def test_flow_matching_learns_and_the_scale_is_fitted(trained, aldp_frames):
    model, (before, after) = trained
    assert after < 0.9 * before
    x = torch.as_tensor(aldp_frames)
    expected = float((x - x.mean(1, keepdim=True)).square().mean().sqrt())
    assert float(model.scale) == pytest.approx(expected)


def test_samples_density_is_the_density_of_the_written_frames(trained):
    """log_q of a sample equals log_prob of the frame written (mirrored frames: q is reflection
    symmetric, so the folded density is 2q), and log_prob includes the scale's Jacobian."""
    model, _ = trained
    torch.manual_seed(1)
    out = model.proposal.weigh(4, model.energy)
    lp = model.log_prob(out["x"])
    torch.testing.assert_close(lp + math.log(2.0), out["log_q"], atol=2e-3, rtol=1e-5)
    mirror = out["x"] * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(model.log_prob(mirror), lp, atol=1e-3, rtol=1e-5)
    # one global scale s: log q(x) = log q_flow(x / s) − 3(N − 1) log s
    y = out["x"] / model.scale
    flow_lp = model.flow.log_prob(y.float()).double()
    torch.testing.assert_close(lp, flow_lp - 63 * torch.log(model.scale), atol=1e-3, rtol=1e-5)


def test_dropped_samples_weigh_zero_and_lower_the_ess(trained):
    model, _ = trained
    torch.manual_seed(2)
    out = model.proposal.weigh(8, model.energy)
    for key in ("wrong_chirality", "mirrored", "broken_topology", "valid"):
        assert out[key].dtype == torch.bool and out[key].shape == (8,)
    assert torch.equal(torch.isfinite(out["log_w"]), out["valid"] & torch.isfinite(out["energy_kT"]))
    res = ImportanceSampler()(model.proposal, model.energy, 8)
    assert res["ess"] == pytest.approx(float(kish_ess(res["log_w"])))
    assert torch.isneginf(res["log_w"][~res["valid"]]).all()
    with pytest.raises(ValueError, match="does not support SMC"):
        SMCSampler(n_steps=2)(model.proposal, model.energy, 4)
    with pytest.raises(ValueError, match="does not support SMC"):
        EquivariantCNF(sampler=SMCSampler())


def test_option_errors_are_clear():
    for kwargs, match in ((dict(encoding="atoms"), "encoding"), (dict(chirality="flip"), "chirality"),
                          (dict(pairing="sinkhorn"), "pairing"), (dict(solver="rk45"), "model.solver must be one of"),
                          (dict(scale=-1.0), "scale"), (dict(loss_weights={"nll": 1.0}), "unknown term"),
                          (dict(prior="gaussian"), "model.prior must be one of"),
                          (dict(time_exponent=0.0), "time_exponent")):
        with pytest.raises(ValueError, match=match):
            EquivariantCNF(**kwargs)


def test_training_times_follow_the_time_exponent_and_held_out_times_stay_uniform(aldp_system, aldp_frames,
                                                                                monkeypatch):
    """time_exponent k: training times t have density k·t^(k−1) (mean k/(k + 1)); val/flow_matching keeps
    uniform times (mean 1/2), so held-out losses of runs with different k compare."""
    x = torch.as_tensor(aldp_frames)
    torch.manual_seed(0)
    model = EquivariantCNF(**TINY, time_exponent=4.0)
    model.build(aldp_system, x)
    field, seen = model.flow.field, []
    forward = field.forward
    monkeypatch.setattr(field, "forward", lambda t, y: (seen.append(t.detach()), forward(t, y))[1])
    with torch.no_grad():
        for _ in range(10):
            model.term_flow_matching(x)
        train = torch.cat(seen)
        seen.clear()
        for _ in range(10):
            model.validation_loss(x)
        held_out = torch.cat(seen)
    assert len(train) >= 500
    assert float(train.mean()) == pytest.approx(0.8, abs=0.03)
    assert float(held_out.mean()) == pytest.approx(0.5, abs=0.04)


def test_the_harmonic_prior_starts_bonds_as_long_as_the_datas_and_is_saved(aldp_system, aldp_frames):
    """prior: harmonic — α fitted at build so that prior samples' summed squared bond lengths (nm) match the
    training frames' on average; α travels in the state dict; the isotropic prior's bonds are far longer."""
    x = torch.as_tensor(aldp_frames)
    bonds = torch.tensor([[a.index, b.index] for a, b in aldp_system.topology.bonds])

    def bond_squares(frames):
        return float((frames[:, bonds[:, 0]] - frames[:, bonds[:, 1]]).square().sum((-1, -2)).mean())

    models = {}
    for prior in ("harmonic", "isotropic"):
        torch.manual_seed(0)
        models[prior] = model = EquivariantCNF(**TINY, prior=prior)
        model.build(aldp_system, x)
    harmonic = models["harmonic"]
    start = harmonic.flow.prior_sample(20_000, torch.float64, generator=torch.Generator().manual_seed(0))
    assert bond_squares(start * harmonic.scale) == pytest.approx(bond_squares(x), rel=0.03)
    iso = models["isotropic"]
    assert bond_squares(iso.flow.prior_sample(2000, torch.float64) * iso.scale) > 5 * bond_squares(x)
    state = harmonic.state_dict()
    assert float(state["density.flow.prior.alpha"]) == float(harmonic.flow.prior.alpha) != 1.0
    torch.manual_seed(0)
    fresh = EquivariantCNF(**TINY, prior="harmonic")
    fresh.build(aldp_system, x[:10])
    fresh.load_state_dict(state)
    assert float(fresh.flow.prior.alpha) == float(harmonic.flow.prior.alpha)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, aldp_data_args):
    tmp_path = tmp_path_factory.mktemp("cnf")
    trainer = dict(max_epochs=2, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
                   check_val_every_n_epoch=1, log_every_n_steps=1, enable_progress_bar=False,
                   logger=dict(class_path="lightning.pytorch.loggers.CSVLogger",
                               init_args=dict(save_dir=str(tmp_path / "logs"), name="", version="run")),
                   callbacks=[
                       dict(class_path="callbacks.SampleEvaluation", init_args=dict(n_samples=24, every_n_epochs=1)),
                       dict(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                            init_args=dict(dirpath=str(tmp_path / "ckpt"), save_last=True)),
                       dict(class_path="callbacks.SampleWriter", init_args=dict(output_dir=str(tmp_path / "samples"))),
                   ])
    data = dict(init_args=dict(aldp_data_args, system=None, batch_size=32, split=list(aldp_data_args["split"])))
    model = dict(init_args=dict(hidden=8, layers=1, solver="rk4", steps=3, sample_batch_size=12, predict_samples=20,
                                ot_chunk=16))
    loss = dict(stages=dict(fm=dict(weights={"flow_matching": 1.0}, epochs=2, lr=1e-3, lr_end=1e-4)))
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(dict(trainer=trainer, data=data, model=model, loss=loss), sort_keys=False))
    run(["fit", "--config", str(CONFIG), "--config", str(small)], tmp_path)
    return tmp_path, small


def test_fit_logs_ess_with_chirality_and_topology_rates(fitted):
    tmp_path, _ = fitted
    rows = list(csv.DictReader(open(tmp_path / "logs" / "run" / "metrics.csv")))
    val = [r for r in rows if r.get("val/ess")]
    assert len(val) == 2
    for key in ("val/flow_matching", "val/wrong_chirality_rate", "val/broken_topology_rate", "val/valid_rate",
                "val/torsion_w2", "val/energy_w2"):
        assert 0 <= float(val[-1][key]) < math.inf, key
    assert any(r.get("train/flow_matching") for r in rows)


def test_predict_writes_samples_with_flags_and_the_checkpoint_restores_the_sampler(fitted, aldp_system):
    tmp_path, small = fitted
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    out = run(["predict", "--config", str(CONFIG), "--config", str(small), "--ckpt_path", str(ckpt)], tmp_path)
    assert "sample checks: wrong chirality" in out
    npz = np.load(predicted_folder(out) / "samples.npz")
    assert {"log_q", "energy_kT", "log_w", "wrong_chirality", "broken_topology", "valid"} <= set(npz.files)
    assert len(npz["log_w"]) == 20 and npz["valid"].dtype == bool
    assert np.array_equal(np.isneginf(npz["log_w"]), ~npz["valid"] | ~np.isfinite(npz["energy_kT"]))
    model = bg.load_generator(ckpt)
    assert isinstance(model, EquivariantCNF) and model.ode.method == "rk4" and model.ode.steps == 3
    torch.manual_seed(0)
    a = model.sample(3)
    torch.manual_seed(0)
    b = model.sample(3)
    torch.testing.assert_close(a, b)


def test_solver_bench_pairs_settings_on_the_same_prior_draws(fitted, monkeypatch):
    """bench/cnf_solvers.py: a converged fixed-step solve of the same x₀ lands on the reference's samples and
    log q; a one-step Euler solve does not; the table has a row per setting."""
    import sys

    from bench import cnf_solvers

    tmp_path, _ = fitted
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    model = bg.load_generator(ckpt)
    torch.manual_seed(0)
    with torch.no_grad():  # a field that bends the paths: solvers differ measurably
        for layer in model.flow.field.layers:
            layer.coord[-1].weight.normal_(0, 0.5)
    energy = model.energy
    ref = cnf_solvers.draw(model, cnf_solvers.parse_setting("dopri5:1e-5"), 6, 3, energy, seed=3)
    fine = cnf_solvers.draw(model, cnf_solvers.parse_setting("rk4:32"), 6, 3, energy, seed=3)
    coarse = cnf_solvers.draw(model, cnf_solvers.parse_setting("euler:1"), 6, 3, energy, seed=3)
    other_seed = cnf_solvers.draw(model, cnf_solvers.parse_setting("rk4:32"), 6, 3, energy, seed=4)
    assert fine.nfe == [128, 128] and coarse.nfe == [1, 1]
    close, far, unpaired = (cnf_solvers.compare(d, ref) for d in (fine, coarse, other_seed))
    assert close["rms_max"] < 1e-6 and abs(close["err_mean"]) < 1e-4 and close["err_max"] < 1e-4
    assert far["rms"] > 100 * close["rms"] and far["err_sd"] > 100 * max(close["err_sd"], 1e-9)
    assert unpaired["rms"] > 1e-3  # other prior draws: other samples
    with pytest.raises(ValueError, match="METHOD:STEPS"):
        cnf_solvers.parse_setting("rk4")

    out = tmp_path / "solvers.md"

    load = bg.load_generator

    def keep_every_sample(path):  # the toy flow's samples all fail the bond check: keep them, so the ESS column is > 0
        m = load(path)
        m.hparams.drop_broken, m.hparams.chirality = False, "keep"
        return m

    monkeypatch.setattr(cnf_solvers.bg, "load_generator", keep_every_sample)
    monkeypatch.setattr(sys, "argv", ["cnf_solvers.py", "--checkpoint", str(ckpt), "--settings", "rk4:2", "euler:4",
                                      "--samples", "4", "--batch", "4", "--energy", "torch", "--out", str(out)])
    cnf_solvers.main()
    rows = [r for r in out.read_text().splitlines() if r.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["dopri5:1e-4", "rk4:2", "euler:4"]
    assert "(reference)" in rows[0] and "+0.000 / 0.000 / 0.000" in rows[0]
    # the ESS/n column is Kish's ESS over n (kish_ess already divides by n; it once divided twice)
    ess = [float(r.split("|")[6]) for r in rows]
    assert all(1 / 4 - 1e-4 <= e <= 1 for e in ess), ess
