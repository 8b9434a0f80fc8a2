"""TarFlow end to end: `bg fit` on configs/aldp_tarflow.yaml (shrunk) with SMC in the evaluation, then
`bg predict` with the importance and SMC sampler configs."""

import csv
import json
from pathlib import Path

import mdtraj as md
import numpy as np
import pytest
import torch
import yaml

import bg
from tests.conftest import predicted_folder
from tests.test_nsf_cli import run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "aldp_tarflow.yaml"
SMC = dict(n_steps=3, langevin_steps=1, step_size=1.0e-7, metropolis=True, batch_size=32)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, aldp_data_args):
    tmp_path = tmp_path_factory.mktemp("tarflow")
    trainer = dict(max_epochs=2, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
                   check_val_every_n_epoch=1, log_every_n_steps=1, enable_progress_bar=False,
                   logger=dict(class_path="lightning.pytorch.loggers.CSVLogger",
                               init_args=dict(save_dir=str(tmp_path / "logs"), name="", version="run")),
                   callbacks=[
                       dict(class_path="callbacks.SampleEvaluation",
                            init_args=dict(n_samples=48, smc=dict(class_path="bg.sampling.SMCSampler", init_args=SMC),
                                           smc_samples=24)),
                       dict(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                            init_args=dict(dirpath=str(tmp_path / "ckpt"), save_last=True)),
                       dict(class_path="callbacks.SampleWriter", init_args=dict(output_dir=str(tmp_path / "samples"))),
                   ])
    data = dict(init_args=dict(aldp_data_args, system=None, batch_size=32, split=list(aldp_data_args["split"])))
    model = dict(init_args=dict(channels=16, blocks=2, layers=1, heads=2, sample_batch_size=32, predict_samples=40,
                                kl_batch_size=8))
    loss = dict(stages=dict(ml=dict(weights={"nll": 1.0}, epochs=1), ml_kl=dict(weights={"nll": 1.0, "kl": 0.01})))
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(dict(trainer=trainer, data=data, model=model, loss=loss), sort_keys=False))
    run(["fit", "--config", str(CONFIG), "--config", str(small)], tmp_path)
    return tmp_path, small


def test_fit_logs_proposal_reweighted_and_smc_metrics_side_by_side(fitted):
    tmp_path, _ = fitted
    rows = list(csv.DictReader(open(tmp_path / "logs" / "run" / "metrics.csv")))
    val = [r for r in rows if r.get("val/ess")]
    assert len(val) == 2
    for key in ("val/energy_w2", "val/energy_w2_reweighted", "val/torsion_w2", "val/torsion_w2_reweighted",
                "val/smc_energy_w2", "val/smc_torsion_w2", "val/smc_ess", "val/smc_acceptance",
                "val/smc_rejection_rate", "val/smc_ancestor_fraction", "val/smc_basin_beta_C7eq"):
        assert np.isfinite(float(val[-1][key])), key
    assert any(r.get("train/kl") for r in rows)  # the second stage trained the reverse KL
    figures = [p.name for p in (tmp_path / "logs" / "run" / "figures").iterdir()]
    assert any(f.startswith("figures_ramachandran") for f in figures)


def test_predict_with_importance_and_smc_samplers(fitted, aldp_system):
    tmp_path, small = fitted
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    base = ["predict", "--config", str(CONFIG), "--config", str(small), "--ckpt_path", str(ckpt)]
    out = run(base + ["--config", str(ROOT / "configs" / "sampler" / "importance.yaml"),
                      "--model.init_args.sampler.init_args.clip_top=5"], tmp_path)
    assert "importance samples" in out
    first = predicted_folder(out)
    stats = json.loads((first / "samples.json").read_text())
    assert stats["sampler"] == "importance" and stats["n_clipped"] == 4  # the top 5 clipped to the 5th
    npz = np.load(first / "samples.npz")
    assert set(npz.files) == {"log_q", "energy_kT", "log_w"} and len(npz["log_w"]) == 40

    smc_cfg = tmp_path / "smc.yaml"
    smc_cfg.write_text(yaml.safe_dump(dict(model=dict(init_args=dict(
        predict_samples=30, sampler=dict(class_path="bg.sampling.SMCSampler", init_args=dict(SMC, torsion_moves=2)))))))
    out = run(base + ["--config", str(smc_cfg)], tmp_path)
    assert "smc samples" in out and "ESS/n before the last resampling" in out and "distinct proposals" in out
    folder = predicted_folder(out)
    assert folder != first and (first / "samples.json").exists()  # the earlier prediction is kept
    traj = md.load(str(folder / "samples.dcd"), top=str(folder / "topology.pdb"))
    npz = np.load(folder / "samples.npz")
    stats = json.loads((folder / "samples.json").read_text())
    assert traj.n_frames == 30 and set(npz.files) == {"energy_kT", "log_w"}
    assert stats["sampler"] == "smc" and len(stats["ess_history"]) == 3 and 0 <= stats["acceptance"] <= 1
    assert 0 <= stats["acceptance_torsion"] <= 1 and 0 <= stats["acceptance_data"] <= 1  # YAML → torsion turns
    # the written energies are those of the written (final) particles
    model = bg.load_generator(ckpt)
    u = model.energy(torch.as_tensor(traj.xyz, dtype=torch.float64))
    np.testing.assert_allclose(u.numpy(), npz["energy_kT"], rtol=1e-4, atol=1e-3)
