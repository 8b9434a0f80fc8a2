"""DDP throughput on this machine: one process vs N gloo processes training the aldp split-channel NSF.

Trains ``configs/aldp_nsf.yaml``'s model (ML stage, and a stage with the reverse-KL term) for a fixed
number of steps through the real CLI (``bg fit``), twice per setting (10 and 10 + ``--steps`` steps):
the difference of the wall times is the time of ``--steps`` steps without start-up. Batch sizes are per device, so N processes see N × the
frames per step; the table reports steps/s and frames/s. Needs the cached aldp MD (``bg data``).

    python bench/ddp_cpu.py --out bench/results/ddp_cpu.md
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(label: str, workdir: Path, devices: int, batch: int, weights: dict, steps: int) -> dict:
    run_dir = workdir / label
    run_dir.mkdir(parents=True, exist_ok=True)
    override = dict(
        loss=dict(stages={"s": {"weights": weights}}),
        trainer=dict(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
                     enable_progress_bar=False, enable_checkpointing=False, callbacks=[],
                     logger=dict(class_path="lightning.pytorch.loggers.CSVLogger",
                                 init_args=dict(save_dir=str(run_dir), name="", version="log"))),
        data=dict(init_args=dict(batch_size=batch)))
    path = run_dir / "override.yaml"
    path.write_text(yaml.safe_dump(override, sort_keys=False))
    strategy = ["--trainer.strategy=ddp", f"--trainer.devices={devices}"] if devices > 1 else []
    cmd = [sys.executable, "-m", "bg", "fit", "--config", "configs/aldp_nsf.yaml", "--config", str(path),
           "--trainer.accelerator=cpu", *strategy]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MASTER_PORT")}
    start = time.time()
    with open(run_dir / "fit.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(env, WANDB_MODE="disabled"))
    wall = time.time() - start
    with open(run_dir / "log" / "metrics.csv") as fh:
        logged = max(int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss"))
    assert logged >= steps - 1, f"{label}: trained to step {logged} only"
    return dict(wall=wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "runs" / "ddp_cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ddp_cpu.md")
    args = parser.parse_args()
    n = args.devices
    settings = [("ML, 1 process, batch 256", 1, 256, {"nll": 1.0}),
                (f"ML, {n} processes, batch {256 // n}/device", n, 256 // n, {"nll": 1.0}),
                (f"ML, {n} processes, batch 256/device", n, 256, {"nll": 1.0}),
                ("ML+KL, 1 process, batch 256", 1, 256, {"nll": 1.0, "kl": 0.1}),
                (f"ML+KL, {n} processes, batch 256/device", n, 256, {"nll": 1.0, "kl": 0.1})]
    lines = [f"# DDP on CPU (gloo): aldp split-channel NSF, time per optimizer step", "",
             f"Machine: {platform.node()} — {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, no GPU. Command: `python bench/ddp_cpu.py --steps {args.steps} "
             f"--devices {n}`.", "",
             "| setting | frames/step (all ranks) | start-up s | s/step | frames/s |", "|---|---|---|---|---|"]
    for label, devices, batch, weights in settings:
        tag = label.split(",")[0].replace("+", "") + f"_{devices}_{batch}"
        short = run(tag + "_short", args.workdir, devices, batch, weights, 10)["wall"]
        long = run(tag, args.workdir, devices, batch, weights, 10 + args.steps)["wall"]
        per_step = (long - short) / args.steps
        frames = devices * batch
        lines.append(f"| {label} | {frames} | {short - 10 * per_step:.1f} | {per_step:.3f} | {frames / per_step:.0f} |")
        print(lines[-1], flush=True)
    lines += ["", "s/step = (wall of 10 + steps − wall of 10 steps) / steps; start-up = imports, data, building the",
              "flow, process-group set-up. Lightning gives each of N ranks cores / N threads; compare frames/s",
              "at equal per-device batch to see what DDP buys on this machine. No GPU was lent to this task: no",
              "NCCL figures."]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
