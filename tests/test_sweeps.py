"""W&B sweep files: each runs as the agent expands it (fast_dev_run), and trials do not collide."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bg.sweeps import agent_command, draw, load_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


def _data_config(tmp_path, aldp_data_args) -> Path:
    """Point the trial at the short test MD instead of the 10 ns the config would generate."""
    path = tmp_path / "test_data.yaml"
    args = dict(aldp_data_args, system=None, split=list(aldp_data_args["split"]), batch_size=32)
    path.write_text(yaml.safe_dump({"data": {"init_args": args}}))
    return path


def _run(argv, tmp_path, env=None):
    assert argv[:2] == ["/usr/bin/env", "python"], argv
    argv = [sys.executable, *argv[2:]]  # the agent's `python` is the active venv's
    (tmp_path / "configs").symlink_to(ROOT / "configs") if not (tmp_path / "configs").exists() else None
    environ = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path),
                   WANDB_SILENT="true", **(env or {}))
    proc = subprocess.run(argv, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, " ".join(argv) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_sweep_macros_expand_like_the_wandb_agent(tmp_path):
    sweep = {"command": ["${env}", "${interpreter}", "-m", "bg", "fit", "${args}"], "program": "bg"}
    argv = agent_command(sweep, {"model.lr": 0.02, "model.rotary": False, "trainer.callbacks": None})
    assert argv == ["/usr/bin/env", "python", "-m", "bg", "fit", "--model.lr=0.02", "--model.rotary=False",
                    "--trainer.callbacks=None"]
    sweep = {"command": ["${interpreter}", "${program}", "--config", "${args_json_file}"], "program": "train.py"}
    argv = agent_command(sweep, {"a.b": 1}, args_json_file=tmp_path / "trial.json")
    assert argv == ["python", "train.py", "--config", str(tmp_path / "trial.json")]
    assert json.loads((tmp_path / "trial.json").read_text()) == {"a.b": 1}
    with pytest.raises(ValueError, match="distribution"):
        draw({"x": {"distribution": "beta", "min": 0, "max": 1}})


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_each_sweep_file_runs_as_the_agent_expands_it(path, tmp_path, aldp_data_args):
    sweep = load_sweep(path)
    assert sweep["metric"]["name"] == "val/ess"
    values = draw(sweep["parameters"], random.Random(0))
    argv = agent_command(sweep, values, args_json_file=tmp_path / "trial.json")
    assert argv[2:6] == ["-m", "bg", "fit", "--config"]
    out = _run(argv + ["--config", str(_data_config(tmp_path, aldp_data_args)), "--trainer.fast_dev_run=true"],
               tmp_path)
    assert "final evaluation: val/ess" in out


def test_sweep_trials_keep_their_own_run_config(tmp_path, aldp_data_args):
    """Two trials in one directory, as an agent runs them: each W&B run gets its own bg_config.yaml
    holding its own values (the stock SaveConfigCallback would refuse the second trial)."""
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "aldp_nsf.yaml")
    data = _data_config(tmp_path, aldp_data_args)
    for run_id, width in (("trial-a", 64), ("trial-b", 16)):
        values = dict(draw(sweep["parameters"], random.Random(1)), **{"model.width": width})
        argv = agent_command(sweep, values)
        _run(argv + ["--config", str(data), "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                     "--trainer.enable_progress_bar=false"], tmp_path, env={"WANDB_RUN_ID": run_id})
    for run_id, width in (("trial-a", 64), ("trial-b", 16)):
        (saved,) = (tmp_path / "runs" / "wandb").glob(f"offline-run-*-{run_id}/files/bg_config.yaml")
        assert yaml.safe_load(saved.read_text())["model"]["init_args"]["width"] == width
