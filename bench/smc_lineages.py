"""How many proposal samples the final SMC particles descend from (lineage collapse), for a checkpoint.

    python bench/smc_lineages.py --checkpoint <ckpt> --particles 1000 --steps 100 --step-size 3e-6 --seeds 0 1
    python bench/smc_lineages.py --checkpoint <ckpt> --schedule adaptive --target-cess 0.95 --langevin-steps 5
    python bench/smc_lineages.py --checkpoint <ckpt> --space latent --step-size 0.01 --schedule adaptive
    python bench/smc_lineages.py --checkpoint <ckpt> --space both --latent-step-size 0.003 --step-size 2e-6
    python bench/smc_lineages.py --checkpoint <ckpt> --schedule adaptive --step-size 2e-6 --torsion-moves 5
    python bench/smc_lineages.py --checkpoint <ckpt> ... --seeds 2 3 --pool   # + one row for the runs pooled

The sampler's options are ``bg.sampling.SMCSampler``'s (MALA moves; ``--steps`` bounds the adaptive schedule).
With ``--reference`` (``reference.pt`` of bench/aldp_reference.py) each run's weighted φ/ψ torsion W2 to the long
reference is printed with 1.5× the reference's split-half floor, the issue's bar, and with what exact samplers read
against it: independent draws of as many frames as there are particles (W2 falls with the sample size; the φ > 0
basins hold < 1 %, so 1,000 particles resolve them to ±0.3 %), and the reference without its φ > 0 frames.
``--pool`` adds a row for all seeds' particles together, each run weighing 1/(number of seeds): independent
runs average their errors away, which one run's resampled particles (copies of fewer ancestors) cannot.
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
from bg.metrics import circular_w2_1d  # noqa: E402
from bg.sampling import SMCSampler  # noqa: E402


def exact_sampler_w2(angles: torch.Tensor, n: int, repeats: int = 20, seed: int = 0) -> torch.Tensor:
    """Torsion W2 (rad, mean of φ and ψ) to ``angles`` ``(N, 2)`` of ``repeats`` draws of ``n`` of its own frames
    without replacement: what an exact sampler of ``n`` independent samples reads, shape ``(repeats,)``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(repeats):
        idx = torch.randperm(len(angles), generator=g)[:n]
        out.append(circular_w2_1d(angles[idx], angles, torch.full((len(idx),), 1.0 / len(idx))).mean())
    return torch.stack(out)


def acceptance(out: dict) -> str:
    """The run's acceptance rate, per kind of move when it made several (e.g. "data 0.62, torsion 0.08")."""
    parts = {k.removeprefix("acceptance_"): v for k, v in out.items() if k.startswith("acceptance_") and v is not None}
    if not parts:
        return f"{out['acceptance']:.2f}" if out["acceptance"] is not None else "–"
    return ", ".join(f"{k} {v:.2f}" for k, v in parts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--step-size", type=float, default=3e-6)
    parser.add_argument("--langevin-steps", type=int, default=1, help="MALA steps per path point")
    parser.add_argument("--schedule", choices=["linear", "adaptive"], default="linear")
    parser.add_argument("--target-cess", type=float, default=0.95, help="conditional ESS/n per adaptive step")
    parser.add_argument("--space", choices=["data", "latent", "both"], default="data",
                        help="particles in Cartesian nm or in the flow's latent space (step size in its units²); "
                             "both: a latent move of --latent-step-size, then a Cartesian one of --step-size")
    parser.add_argument("--latent-step-size", type=float, help="latent units² (--space both)")
    parser.add_argument("--torsion-moves", type=int, default=0, help="Metropolis torsion turns after each MALA step")
    parser.add_argument("--torsions", choices=["backbone", "rotatable"], default="backbone")
    parser.add_argument("--torsion-max-angle", type=float, default=3.141592653589793, help="rad")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--reference", help="reference.pt of bench/aldp_reference.py: torsion W2 against it")
    parser.add_argument("--pool", action="store_true", help="one more row: every seed's particles together")
    args = parser.parse_args()
    model = bg.load_generator(args.checkpoint)
    ref = torch.load(args.reference, weights_only=False) if args.reference else None
    if ref is not None:
        print(f"reference {args.reference}: φ > 0 = {ref['phi_positive']:.4f} ± {ref['phi_positive_sigma']:.4f}, "
              f"split-half torsion W2 {ref['split_half_torsion_w2']:.3f} (bar: 1.5× = "
              f"{1.5 * ref['split_half_torsion_w2']:.3f})")
        exact = exact_sampler_w2(ref["angles"], args.particles)
        negative = ref["angles"][ref["angles"][:, 0] <= 0]
        missing = circular_w2_1d(negative, ref["angles"], torch.full((len(negative),), 1.0 / len(negative))).mean()
        print(f"exact samplers against it: {args.particles} of its frames drawn at random read "
              f"{exact.median():.3f} (10–90 %: {exact.quantile(0.1):.3f}–{exact.quantile(0.9):.3f}, {len(exact)} draws); "
              f"all of its frames but those at φ > 0 read {missing:.3f}")
    unit = {"data": "nm²", "latent": "latent units²"}.get(
        args.space, f"nm² after a latent move of {args.latent_step_size} latent units²")
    print(f"SMC in {args.space} space: {args.particles} particles, {args.schedule} schedule ({args.steps} points at "
          f"most), {args.langevin_steps} MALA step(s) of h = {args.step_size:g} {unit} per point"
          + (f", each followed by {args.torsion_moves} turn(s) of a random {args.torsions} torsion by up to "
             f"{args.torsion_max_angle:.2f} rad" if args.torsion_moves else ""))
    print("| seed | time | path points | resamplings | distinct ancestors | final ESS/n | acceptance | basins "
          + " / ".join(BASINS) + " | φ > 0 | torsion W2 to the reference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    pooled = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        t0 = time.time()
        sampler = SMCSampler(n_steps=args.steps, step_size=args.step_size, batch_size=1000,
                             langevin_steps=args.langevin_steps, schedule=args.schedule, target_cess=args.target_cess,
                             space=args.space, latent_step_size=args.latent_step_size,
                             torsion_moves=args.torsion_moves, torsions=args.torsions,
                             torsion_max_angle=args.torsion_max_angle)
        out = sampler(model.proposal, model.energy, args.particles, generator=torch.Generator().manual_seed(seed))
        phi, psi = phi_psi(out["x"], model.topology)
        angles, w = torch.cat([phi, psi], 1), torch.softmax(out["log_w"], 0)
        pooled.append((angles, w))
        print(f"| {seed} | {time.time() - t0:.0f} s | {len(out['path'])} | {len(out['resampled_at'])} | {out['n_ancestors']} | "
              f"{out['ess']:.3f} | {acceptance(out)} | {populations(angles, w, ref)} |", flush=True)
    if args.pool and len(pooled) > 1:
        angles = torch.cat([a for a, _ in pooled])
        w = torch.cat([w for _, w in pooled]) / len(pooled)
        print(f"| {len(pooled)} seeds pooled | | | | | | | {populations(angles, w, ref)} |")
        if ref is not None:
            exact = exact_sampler_w2(ref["angles"], len(angles))
            print(f"exact samplers of {len(angles)} frames read {exact.median():.3f} "
                  f"(10–90 %: {exact.quantile(0.1):.3f}–{exact.quantile(0.9):.3f})")


def populations(angles: torch.Tensor, w: torch.Tensor, ref: dict | None) -> str:
    """Table cells: basin populations, the φ > 0 population and the torsion W2 to the reference of weighted
    φ/ψ ``angles`` ``(n, 2)`` rad with normalised weights ``w`` ``(n,)``."""
    b = basin_populations(angles[:, 0], angles[:, 1], torch.log(w))
    phi_positive = b["alpha_L"] + b["C7ax"]  # the two basins are the φ > 0 half (bg.analysis.basin_index)
    w2 = "–" if ref is None else f"{float(circular_w2_1d(angles, ref['angles'], w).mean()):.3f}"
    return " / ".join(f"{b[k]:.3f}" for k in BASINS) + f" | {phi_positive:.4f} | {w2}"


if __name__ == "__main__":
    main()
