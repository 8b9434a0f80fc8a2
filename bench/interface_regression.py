"""Numerical identity of generators across a code change (the generator-interface reshape, issue 14).

``--make``: short alanine-dipeptide MD, then each family trained for a few steps with its
``configs/aldp_*.yaml`` architecture, saved as a Lightning checkpoint (``<dir>/<family>.ckpt``).
``--record <name>``: load every checkpoint with ``bg.load_generator``, cast to float64, and store
``log_prob`` of fixed MD frames and seeded samples with their ``log_q`` (``<dir>/<name>.pt``).
``--compare a b``: the largest absolute differences between two recordings.

Run ``--make --record before`` on the old code, ``--record after --compare before after`` on the
new one: checkpoints written by the old code must load (key conversion) and give the same numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES = {"nsf": ("configs/aldp_nsf.yaml", "bg.models.SplitChannelNSF"),
            "tarflow": ("configs/aldp_tarflow.yaml", "bg.models.TarFlowGenerator"),
            "cnf": ("configs/aldp_cnf.yaml", "bg.models.EquivariantCNF")}
#: samples and frames per family (the CNF's exact log q costs seconds per sample)
COUNTS = {"nsf": 64, "tarflow": 64, "cnf": 4}


def make(out: Path, steps: int) -> None:
    import importlib

    import lightning as L

    from bg.systems import MDSettings, aldp, simulate
    from datamodules import MDDataModule

    md_dir = out / "md"
    if not (md_dir / "topology.pdb").exists():
        simulate(aldp(), md_dir, MDSettings(n_frames=400, steps_per_frame=250, equilibration_steps=2000,
                                            chunk_frames=200, seed=3), progress=False)
    for family, (config, cls_path) in FAMILIES.items():
        args = yaml.safe_load(Path(config).read_text())["model"]["init_args"]
        module, _, name = cls_path.rpartition(".")
        L.seed_everything(0)
        model = getattr(importlib.import_module(module), name)(**args)
        dm = MDDataModule(topology=str(md_dir / "topology.pdb"), trajectories=[str(md_dir / "chunks" / "*.dcd")],
                          forcefield="amber99sbildn-obc", batch_size=64, split=(0.8, 0.1, 0.1))
        trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False)
        trainer.fit(model, datamodule=dm)
        trainer.save_checkpoint(out / f"{family}.ckpt")
        print(f"{family}: {steps} steps -> {out / f'{family}.ckpt'}", flush=True)


def record(out: Path, name: str) -> None:
    import numpy as np

    from bg import load_generator
    from bg.systems import load_md

    frames = torch.as_tensor(load_md(out / "md").xyz.astype(np.float64))
    result = {}
    for family in FAMILIES:
        n = COUNTS[family]
        model = load_generator(out / f"{family}.ckpt").double()
        x = frames[::max(1, len(frames) // n)][:n]
        with torch.no_grad():
            torch.manual_seed(11)
            xs, log_q = model.sample(n)
            log_prob = model.log_prob(x)
        result[family] = dict(log_prob=log_prob, samples=xs, log_q=log_q, **weighted_and_smc(model, family, n))
        print(f"{family}: log_prob mean {log_prob.mean():.6f}, log_q mean {log_q.mean():.6f}", flush=True)
    torch.save(result, out / f"{name}.pt")


def weighted_and_smc(model, family: str, n: int) -> dict:
    """Seeded importance-weighted samples (with the family's checks) and, where supported, seeded SMC."""
    from bg.sampling import SMCSampler

    torch.manual_seed(12)
    out = dict(is_log_w=run(model, n, None, None)["log_w"])
    if family != "cnf":
        torch.manual_seed(13)
        smc = run(model, n, SMCSampler(n_steps=3, langevin_steps=2, step_size=1e-7), torch.Generator().manual_seed(5))
        out.update(smc_x=smc["x"], smc_log_w=smc["log_w"])
    return out


def run(model, n: int, sampler, generator) -> dict:
    if hasattr(model, "run_sampler"):  # the interface before issue 14
        return model.run_sampler(n, sampler, generator=generator)
    from bg.sampling import ImportanceSampler

    return (sampler or ImportanceSampler())(model.proposal, model.energy, n, generator=generator)


def compare(out: Path, a: str, b: str) -> None:
    ra, rb = torch.load(out / f"{a}.pt"), torch.load(out / f"{b}.pt")
    keys = ("log_prob", "samples", "log_q", "is_log_w", "smc_x", "smc_log_w")
    print("max abs difference per quantity: log_prob of MD frames, seeded samples (nm) and their log_q, "
          "importance log_w, SMC particles (nm) and log_w")
    print("| family | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    worst = 0.0
    for family in FAMILIES:
        d = []
        for k in keys:
            if k not in ra[family]:
                d.append("—")
                continue
            a, b = ra[family][k], rb[family][k]
            same_inf = (a == b) | (torch.isfinite(a) & torch.isfinite(b))
            if not bool(same_inf.all()):
                d.append("inf")
                worst = float("inf")
                continue
            diff = float((a - b).nan_to_num(0.0, 0.0, 0.0).abs().max())
            worst = max(worst, diff)
            d.append(f"{diff:.1e}")
        print(f"| {family} | " + " | ".join(d) + " |")
    print(f"worst: {worst:.2e} ({'OK' if worst <= 1e-10 else 'DIFFERENT'} at 1e-10)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("bench/runs/interface"))
    p.add_argument("--make", action="store_true", help="generate MD and train/save the three checkpoints")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--record", metavar="NAME")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.make:
        make(args.dir, args.steps)
    if args.record:
        record(args.dir, args.record)
    if args.compare:
        compare(args.dir, *args.compare)


if __name__ == "__main__":
    main()
