"""A five-minute first run that shows every output of bg (``make demo``, ``python -m bg.demo``).

Three commands in one process, as a user would type them:

1. ``bg fit --config configs/aldp_demo.yaml`` — 1 ns of replica-exchange MD of alanine dipeptide (cached),
   a small split-channel NSF, sample evaluations (metrics and figures in the W&B offline run);
2. ``bg predict --config configs/aldp_demo.yaml --ckpt_path <last.ckpt>`` — weighted samples into a folder
   of their own;
3. ``bg analyze <samples folder> --reference <the MD>`` — basin populations, free-energy differences and
   φ/ψ free-energy surfaces with error bars, beside the MD's own.

It ends with a list of where each output is and how long each step took.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "aldp_demo.yaml"


def _last_checkpoint(trainer) -> Path:
    for ckpt in trainer.checkpoint_callbacks:
        if getattr(ckpt, "last_model_path", ""):
            return Path(ckpt.last_model_path)
    raise RuntimeError("the demo config saves no last.ckpt (ModelCheckpoint save_last: true)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bg.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the demo config (default: configs/aldp_demo.yaml)")
    parser.add_argument("--out", default=None, help="analysis folder (default: analysis/demo_<time>)")
    args = parser.parse_args(argv)

    import bg
    from bg.lightning_cli import run
    from callbacks import SampleWriter

    times, start = {}, time.time()
    print(f"[1/3] bg fit --config {args.config}", flush=True)
    fit = run(["fit", "--config", args.config])
    times["data + training"] = time.time() - start
    ckpt = _last_checkpoint(fit.trainer)
    dm = fit.datamodule
    reference = [str(p) for p in dm.trajectory_paths()]
    topology = str(dm.md_dir / "topology.pdb")

    t = time.time()
    print(f"\n[2/3] bg predict --config {args.config} --ckpt_path {ckpt}", flush=True)
    predict = run(["predict", "--config", args.config, "--ckpt_path", str(ckpt)])
    writer = next(cb for cb in predict.trainer.callbacks if isinstance(cb, SampleWriter))
    samples = writer.run_dir
    times["sampling"] = time.time() - t

    t = time.time()
    print(f"\n[3/3] bg analyze {samples} --reference <the demo's MD> --topology {topology}", flush=True)
    report = bg.evaluate(samples, reference=reference, topology=topology, n_boot=200)
    out = Path(args.out or f"analysis/demo_{time.strftime('%Y%m%d-%H%M%S')}")
    report.save(out)
    print(report.markdown())
    times["analysis"] = time.time() - t

    run_dir = Path(fit.trainer.loggers[0].experiment.dir).parent if fit.trainer.loggers else None
    print("\nDemo outputs")
    print(f"  checkpoints        {ckpt.parent}/ (last.ckpt, best-*.ckpt by val/ess)")
    if run_dir is not None:
        print(f"  metrics, figures   {run_dir}/ (W&B offline run; figures under files/media/images; upload with "
              f"`wandb sync {run_dir}`)")
    print(f"  samples            {samples}/ (samples.dcd + topology.pdb, samples.npz: energy_kT, log_q, log_w)")
    print(f"  analysis           {out}/ (report.md, report.json, free-energy surfaces as PNG)")
    print("  times              " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; in all {time.time() - start:.0f} s")
    print("Next: `make train` for a generator worth its samples (ESS/n ≈ 0.5, ~27 min on 2 cores).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
