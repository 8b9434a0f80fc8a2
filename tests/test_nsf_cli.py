"""End to end through the real entry points: `bg fit` / `bg predict` on configs/aldp_nsf.yaml (shrunk),
checkpoints, figures, sample files, `bg.load_generator`, the W&B offline default."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mdtraj as md
import numpy as np
import pytest
import torch
import yaml

import bg
from bg.energy import OpenMMEnergy
from tests.conftest import predicted_folder

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "aldp_nsf.yaml"


def shrink(tmp_path, aldp_data_args, tiny_nsf_kwargs, logger="csv") -> Path:
    """A config layered over configs/aldp_nsf.yaml: tiny flow, short MD, two short epochs."""
    trainer = dict(max_epochs=2, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
                   check_val_every_n_epoch=1, log_every_n_steps=1, enable_progress_bar=False,
                   callbacks=[
                       dict(class_path="callbacks.SampleEvaluation", init_args=dict(n_samples=64)),
                       dict(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                            init_args=dict(dirpath=str(tmp_path / "ckpt"), save_last=True)),
                       dict(class_path="callbacks.SampleWriter", init_args=dict(output_dir=str(tmp_path / "samples"))),
                   ])
    if logger == "csv":
        trainer["logger"] = dict(class_path="lightning.pytorch.loggers.CSVLogger",
                                 init_args=dict(save_dir=str(tmp_path / "logs"), name="", version="run"))
    else:
        trainer["logger"] = dict(class_path="lightning.pytorch.loggers.WandbLogger",
                                 init_args=dict(save_dir=str(tmp_path / "runs"), project="bg", offline=True))
    data = dict(init_args=dict(aldp_data_args, system=None, batch_size=32, split=list(aldp_data_args["split"])))
    model = dict(init_args=dict(tiny_nsf_kwargs, predict_samples=50))
    path = tmp_path / "small.yaml"
    loss = dict(stages=dict(ml=dict(weights={"nll": 1.0}, epochs=1),
                            ml_w2_kl=dict(weights={"nll": 1.0, "w2": 10.0, "kl": 0.1})))
    path.write_text(yaml.safe_dump(dict(trainer=trainer, data=data, model=model, loss=loss), sort_keys=False))
    return path


def run(args, tmp_path, **env):
    environ = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true",
                   OMP_NUM_THREADS="1", **env)
    proc = subprocess.run([sys.executable, "-m", "bg", *args], cwd=tmp_path, env=environ, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, aldp_data_args, tiny_nsf_kwargs):
    tmp_path = tmp_path_factory.mktemp("fit")
    small = shrink(tmp_path, aldp_data_args, tiny_nsf_kwargs)
    out = run(["fit", "--config", str(CONFIG), "--config", str(small)], tmp_path)
    return tmp_path, small, out


def test_fit_writes_checkpoint_metrics_figures_and_config(fitted):
    tmp_path, _, out = fitted
    assert (tmp_path / "ckpt" / "last.ckpt").exists() and "checkpoint:" in out
    with open(tmp_path / "logs" / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    keys = {k for r in rows for k, v in r.items() if v}
    for key in ("train/nll", "train/w2", "train/kl", "train/stage", "val/nll", "val/ess", "val/distance_distortion",
                "val/energy_w2", "val/torsion_w2", "val/torsion_w2_reweighted", "val/finite_fraction",
                "val/low_energy_fraction", "val/basin_alpha_R", "val/basin_alpha_R_reweighted"):
        assert key in keys, key
    ess = [float(r["val/ess"]) for r in rows if r.get("val/ess")]
    assert len(ess) == 2 and all(0 < e <= 1 for e in ess)
    figures = sorted(p.name for p in (tmp_path / "logs" / "run" / "figures").iterdir())
    assert any(f.startswith("figures_energy") for f in figures) and any(f.startswith("figures_ramachandran") for f in figures)
    saved = yaml.safe_load((tmp_path / "logs" / "run" / "bg_config.yaml").read_text())
    assert saved["model"]["class_path"] == "bg.models.SplitChannelNSF"


def test_predict_writes_readable_samples_with_correct_weights(fitted, aldp_system):
    tmp_path, small, _ = fitted
    # the checkpoint's hyperparameters say 50; a sampling option on the command line wins over them
    out = run(["predict", "--config", str(CONFIG), "--config", str(small), "--ckpt_path",
               str(tmp_path / "ckpt" / "last.ckpt"), "--model.init_args.predict_samples=30"], tmp_path)
    assert "wrote 30 samples" in out
    folder = predicted_folder(out)
    assert folder.parent == tmp_path / "samples"  # a folder of this prediction's own
    traj = md.load(str(folder / "samples.dcd"), top=str(folder / "topology.pdb"))
    weights = np.load(folder / "samples.npz")
    assert traj.n_frames == 30 and traj.n_atoms == 22
    np.testing.assert_allclose(weights["log_w"], -weights["energy_kT"] - weights["log_q"])
    # Energies recomputed by OpenMM on the written (float32) frames agree.
    u = OpenMMEnergy(aldp_system.create_openmm_system(), aldp_system.temperature)(torch.tensor(traj.xyz, dtype=torch.float64))
    finite = np.isfinite(weights["energy_kT"]) & (weights["energy_kT"] < 1e4)
    np.testing.assert_allclose(u.numpy()[finite], weights["energy_kT"][finite], rtol=1e-3, atol=0.05)


def test_predict_stops_at_sigterm(fitted):
    tmp_path, small, _ = fitted
    environ = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = tmp_path / "predict_sigterm.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "bg", "predict", "--config", str(CONFIG), "--config", str(small),
                                 "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                                 "--model.init_args.predict_samples=2000000"], cwd=tmp_path, env=environ, stdout=fh,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while "Loaded model weights" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    text = log.read_text()
    assert rc == 143 and "bg predict: SIGTERM, stopping (no samples written)" in text, text[-2000:]
    assert "Traceback" not in text
    assert "💡" not in text and "Couldn't infer" not in text  # Lightning notices a user cannot act on
    assert not [d for d in (tmp_path / "samples").iterdir() if d.is_dir() and not any(d.iterdir())]  # no empty folder


def test_load_generator_in_a_notebook(fitted, aldp_system):
    tmp_path, _, _ = fitted
    model = bg.load_generator(tmp_path / "ckpt" / "last.ckpt")
    assert not model.training and model.topology.n_atoms == 22
    torch.manual_seed(0)
    x, log_q = model.sample(8)
    assert x.shape == (8, 22, 3) and log_q.shape == (8,)
    torch.testing.assert_close(model.log_prob(x), log_q, rtol=0, atol=2e-3)
    ref = OpenMMEnergy(aldp_system.create_openmm_system(), aldp_system.temperature)(x)
    torch.testing.assert_close(model.energy(x), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        bg.load_generator(tmp_path / "nope.ckpt")


def test_wandb_offline_default_prints_where_the_run_is(tmp_path, aldp_data_args, tiny_nsf_kwargs):
    small = shrink(tmp_path, aldp_data_args, tiny_nsf_kwargs, logger="wandb")
    out = run(["fit", "--config", str(CONFIG), "--config", str(small), "--trainer.max_epochs=1"], tmp_path)
    line = next(line for line in out.splitlines() if line.startswith("W&B offline run:"))
    run_dir = Path(line.split(":", 1)[1].strip())
    if not run_dir.is_absolute():
        run_dir = tmp_path / run_dir
    assert run_dir.name.startswith("offline-run-") and (run_dir / "files" / "bg_config.yaml").exists()
    assert f"wandb sync {line.split(':', 1)[1].strip()}" in out
    runs = sorted(run_dir.parent.glob("offline-run-*"))
    out = run(["predict", "--config", str(CONFIG), "--config", str(small), "--ckpt_path",
               str(tmp_path / "ckpt" / "last.ckpt")], tmp_path)
    assert "wrote 50 samples" in out and sorted(run_dir.parent.glob("offline-run-*")) == runs  # no empty W&B run


def test_fit_without_a_logger_writes_under_runs_not_the_working_directory(tmp_path, aldp_data_args, tiny_nsf_kwargs):
    small = shrink(tmp_path, aldp_data_args, tiny_nsf_kwargs)
    before = set(tmp_path.iterdir())
    run(["fit", "--config", str(CONFIG), "--config", str(small), "--trainer.max_epochs=1", "--trainer.logger=false"],
        tmp_path)
    assert (tmp_path / "runs" / "bg_config.yaml").exists() and (tmp_path / "runs" / "figures").is_dir()
    assert {p.name for p in set(tmp_path.iterdir()) - before} <= {"runs", "ckpt", "samples"}


def test_lightning_alias_and_help():
    exe = Path(sys.executable).parent / "lightning"
    if not exe.exists():
        pytest.skip("the `lightning` console script is not installed in this environment")
    out = subprocess.run([str(exe), "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--model" in out.stdout and "--data" in out.stdout
