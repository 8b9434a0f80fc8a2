"""bench/gpu.py at toy sizes on the CPU: every family builds from its config + GPU overlay's code path, trains a
step, samples with finite log q and is judged by the torch force field; the table is written."""

import math
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu  # noqa: E402


def test_gpu_bench_runs_every_family_at_toy_sizes(tmp_path):
    out = tmp_path / "gpu.md"
    rows = gpu.main(["--toy", "--device", "cpu", "--repeats", "1", "--out", str(out)])
    assert [r["family"] for r in rows] == list(gpu.FAMILIES)
    for row in rows:
        assert row["params"] > 0 and row["batch"] == gpu.TOY_BATCH and row["samples"] == gpu.TOY_SAMPLES
        keys = ("train step (s)", "samples/s with log q", "energy frames/s")
        if row["family"] != "cnf":  # the energy stage of the recipes (the CNF has none)
            keys += ("energy step (s)",)
        for key in keys:
            assert math.isfinite(row[key]) and row[key] > 0, (row["family"], key)
    text = out.read_text()
    assert text.count("\n| ") == 1 + len(rows) and "toy (--toy)" in text


def test_a_failing_family_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    """On a leased device one family's error must not lose the others' figures: it lands in the table."""
    measure = gpu.measure

    def failing(family, *args, **kwargs):
        if family == "nsf":
            raise RuntimeError("CUDA error: out of memory")
        return measure(family, *args, **kwargs)

    monkeypatch.setattr(gpu, "measure", failing)
    out = tmp_path / "gpu.md"
    rows = gpu.main(["--toy", "--device", "cpu", "--repeats", "1", "--families", "nsf", "tarflow",
                     "--out", str(out)])
    assert rows[0] == {"family": "nsf", "error": "RuntimeError: CUDA error: out of memory"}
    assert rows[1]["family"] == "tarflow" and rows[1]["energy step (s)"] > 0
    text = out.read_text()
    assert "| nsf | failed: RuntimeError: CUDA error: out of memory |" in text and "| tarflow | " in text


def test_gpu_overlays_change_only_sizes_devices_and_batches():
    """The GPU configs layer over the CPU ones: every key they set exists in the CPU config (no typo that
    LightningCLI would refuse only on the GPU machine)."""
    for family in gpu.FAMILIES:
        cpu = yaml.safe_load((ROOT / "configs" / f"aldp_{family}.yaml").read_text())
        overlay = yaml.safe_load((ROOT / "configs" / "gpu" / f"aldp_{family}.yaml").read_text())
        for section in ("model", "data"):
            assert set(overlay[section]["init_args"]) <= set(cpu[section]["init_args"]), (family, section)
        assert set(overlay["trainer"]) <= {"accelerator", "devices", "precision"}


def test_the_gpu_long_recipe_layers_over_the_cpu_one(tmp_path):
    """configs/gpu/aldp_nsf_long.yaml through the real LightningCLI parser over the CPU recipe (accelerator set
    to the CPU here): its stages fill max_epochs exactly, and only batch sizes, stages and the guard change."""
    from datetime import timedelta

    from lightning.pytorch.callbacks import Timer

    from bg.lightning_cli import BGCLI
    from bg.models import SplitChannelNSF
    from callbacks import LossStages
    from datamodules import MDDataModule

    overlay = ROOT / "configs" / "gpu" / "aldp_nsf_long.yaml"
    cli = BGCLI(args=["--config", str(ROOT / "configs" / "aldp_nsf_long.yaml"), "--config", str(overlay),
                      "--trainer.accelerator=cpu", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                      f"--trainer.logger.init_args.save_dir={tmp_path}"],
                model_class=SplitChannelNSF.__mro__[1], datamodule_class=MDDataModule.__mro__[1],
                subclass_mode_model=True, subclass_mode_data=True, run=False)
    stages = next(c for c in cli.trainer.callbacks if isinstance(c, LossStages)).stages
    assert sum(s.epochs for s in stages) == cli.trainer.max_epochs == 120
    assert stages[-1].weights == {"logvar": 1.0, "alpha2": 1.0}
    assert cli.model.hparams.kl_batch_size == 2048 and cli.datamodule.batch_size == 1024
    timer = next(c for c in cli.trainer.callbacks if isinstance(c, Timer))  # how Lightning keeps max_time
    assert timer._duration == timedelta(minutes=8).total_seconds()
    cpu = yaml.safe_load((ROOT / "configs" / "aldp_nsf_long.yaml").read_text())
    layer = yaml.safe_load(overlay.read_text())
    assert set(layer["model"]["init_args"]) <= set(cpu["model"]["init_args"])
    assert set(layer["data"]["init_args"]) <= set(cpu["data"]["init_args"])
