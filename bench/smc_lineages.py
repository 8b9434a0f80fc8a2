"""How many proposal samples the final SMC particles descend from (lineage collapse), for a checkpoint.

    python bench/smc_lineages.py --checkpoint <ckpt> --particles 1000 --steps 100 --step-size 3e-6 --seeds 0 1
    python bench/smc_lineages.py --checkpoint <ckpt> --schedule adaptive --target-cess 0.95 --langevin-steps 5

The sampler's options are ``bg.sampling.SMCSampler``'s (MALA moves; ``--steps`` bounds the adaptive schedule).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bg  # noqa: E402
from bg.analysis import BASINS, basin_populations, phi_psi  # noqa: E402
from bg.sampling import SMCSampler  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--step-size", type=float, default=3e-6)
    parser.add_argument("--langevin-steps", type=int, default=1, help="MALA steps per path point")
    parser.add_argument("--schedule", choices=["linear", "adaptive"], default="linear")
    parser.add_argument("--target-cess", type=float, default=0.95, help="conditional ESS/n per adaptive step")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    model = bg.load_generator(args.checkpoint)
    print(f"SMC: {args.particles} particles, {args.schedule} schedule ({args.steps} points at most), "
          f"{args.langevin_steps} MALA step(s) of h = {args.step_size:g} nm² per point")
    print("| seed | time | path points | resamplings | distinct ancestors | final ESS/n | acceptance | basins "
          + " / ".join(BASINS) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        torch.manual_seed(seed)
        t0 = time.time()
        sampler = SMCSampler(n_steps=args.steps, step_size=args.step_size, batch_size=1000,
                             langevin_steps=args.langevin_steps, schedule=args.schedule, target_cess=args.target_cess)
        out = sampler(model.proposal, model.energy, args.particles, generator=torch.Generator().manual_seed(seed))
        phi, psi = phi_psi(out["x"], model.topology)
        b = basin_populations(phi[:, 0], psi[:, 0], out["log_w"])
        print(f"| {seed} | {time.time() - t0:.0f} s | {len(out['path'])} | {len(out['resampled_at'])} | {out['n_ancestors']} | "
              f"{out['ess']:.3f} | {out['acceptance']:.2f} | "
              + " / ".join(f"{b[k]:.3f}" for k in BASINS) + " |", flush=True)


if __name__ == "__main__":
    main()
