"""SMC in an NSF's latent space on a protein (issue 20): from the flow's samples to exp(−u) through annealed MALA moves.

Importance sampling alone gives villin one effective sample of 20,000 (log weights spread over 140–300 nats,
bench/results/villin_log_weight_terms.md). SMC anneals E_t = (1 − t)(−log q) + t·u, resamples when the weights
degenerate and moves the particles with MALA between path points. In the flow's latent space (``space: latent``:
standardised base points, ``bg.flows.nsf.InternalFlow.from_latent``) one step size suits every coordinate as far
as the flow has learned the stiff directions (``--probe`` measures how far). The path runs on the model's own
target (the torch force field); the final particles are then judged by OpenMM: their log weights are corrected by
u_torch − u_OpenMM, and the Kish ESS/n of both is printed, with the number of distinct proposals the final
particles descend from.

    python bench/protein_smc.py --checkpoint runs/bg/lff408o2/checkpoints/last.ckpt --particles 256 \\
        --steps 400 --step-size 1e-4 --target-cess 0.5 --out bench/results/villin_smc.md

``--probe U`` runs no SMC: it sizes the step first. For ``--particles`` flow samples with u < U kT it prints the
gradient norms of both ends of the path in latent space and the MALA acceptance at the target (t = 1) per step size:

    python bench/protein_smc.py --checkpoint runs/bg/lff408o2/checkpoints/last.ckpt --particles 64 --probe -1300
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bg  # noqa: E402
from bg.energy import target_energy  # noqa: E402
from bg.report import weighted_quantiles  # noqa: E402
from bg.sampling import SMCSampler, kish_ess  # noqa: E402
from bg.sampling.kernels import MALA, Particles  # noqa: E402
from bg.sampling.proposal import batched  # noqa: E402
from bg.sampling.smc import evaluator  # noqa: E402


def quantiles(u: torch.Tensor, w: torch.Tensor | None = None) -> str:
    """5 / 50 / 95 % of ``u`` (kT), weighted by normalised ``w`` when given (``bg.report.weighted_quantiles``)."""
    if w is None:
        q = torch.quantile(u, torch.tensor([0.05, 0.5, 0.95], dtype=u.dtype)).tolist()
    else:
        q = weighted_quantiles(u.numpy(), (0.05, 0.5, 0.95), torch.log(w).numpy())
    return " / ".join(f"{v:,.0f}" for v in q)


def probe(model, n: int, bound: float, batch_size: int, seed: int) -> None:
    """Gradient sizes and MALA acceptance at t = 1 in latent space for flow samples with u < ``bound`` kT."""
    proposal = model.proposal.latent()
    torch.manual_seed(seed)
    z = proposal.particles(n)
    evaluate = evaluator(lambda s: -proposal.log_prob(s), proposal.target(model.energy), batch_size)
    e0, e1, g0, g1 = evaluate(z)
    with torch.no_grad():
        u = batched(model.energy, proposal.frames(z), batch_size)
    keep = u < bound
    print(f"{int(keep.sum())} of {n} samples with u < {bound:g} kT; latent dimension D = {z.shape[1]}")
    print(f"median |∇E0| (the base, ≈ √D = {z.shape[1] ** 0.5:.0f} for a standard normal): "
          f"{float(g0[keep].norm(dim=1).median()):.0f}; median |∇E1| (u(f(z)) − log|det|): "
          f"{float(g1[keep].norm(dim=1).median()):.0f}")
    p = Particles(z[keep], e0[keep], e1[keep], g0[keep], g1[keep])
    print("| h (latent units²) | MALA acceptance at t = 1 (3 proposals per sample) |\n|---|---|")
    for h in (1e-2, 1e-3, 1e-4, 1e-5):
        accepted = sum(MALA(h).step(p, 1.0, evaluate, torch.Generator().manual_seed(s))[1] for s in range(3))
        print(f"| {h:g} | {accepted / (3 * len(p.x)):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--particles", type=int, default=256)
    parser.add_argument("--steps", type=int, default=400, help="path points at most (adaptive schedule)")
    parser.add_argument("--step-size", type=float, default=0.01, help="MALA step in latent units²")
    parser.add_argument("--langevin-steps", type=int, default=1, help="MALA steps per path point")
    parser.add_argument("--target-cess", type=float, default=0.5, help="conditional ESS/n per adaptive step")
    parser.add_argument("--batch-size", type=int, default=64, help="particles per energy/gradient evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="markdown file to append the result row to")
    parser.add_argument("--probe", type=float, metavar="U",
                        help="no SMC: gradient sizes and MALA acceptance at t = 1 for samples with u < U kT")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = bg.load_generator(args.checkpoint)
    model.eval()
    if args.probe is not None:
        probe(model, args.particles, args.probe, args.batch_size, args.seed)
        return
    torch.manual_seed(args.seed)
    sampler = SMCSampler(n_steps=args.steps, langevin_steps=args.langevin_steps, step_size=args.step_size,
                         schedule="adaptive", target_cess=args.target_cess, space="latent", batch_size=args.batch_size)
    t0 = time.time()
    out = sampler(model.proposal, model.energy, args.particles, generator=torch.Generator().manual_seed(args.seed),
                  progress=True)
    minutes = (time.time() - t0) / 60
    t_end = float(out["path"][-1]) if len(out["path"]) else float("nan")
    openmm = target_energy(model.system, backend="openmm")
    with torch.no_grad():
        u_omm = batched(openmm, out["x"], 256).double()
    u_torch = out["energy_kT"].double()
    log_w = out["log_w"].double()
    log_w_omm = log_w - (u_omm - u_torch)
    ess_torch, ess_omm = float(kish_ess(log_w)), float(kish_ess(log_w_omm))
    w = torch.softmax(log_w_omm, 0)
    row = (f"| {Path(args.checkpoint).parent.parent.name} | {args.particles} | {args.step_size:g} × "
           f"{args.langevin_steps} | {args.target_cess} | {len(out['path'])} (t = {t_end:.3g}) | "
           f"{len(out['resampled_at'])} | {out['n_ancestors']} | {out['acceptance']:.2f} | {ess_torch:.4f} | "
           f"{ess_omm:.4f} | {quantiles(u_omm)} | {quantiles(u_omm, w)} | "
           f"{float((u_omm - u_torch).abs().max()):.2g} | {minutes:.1f} min |")
    header = ("| checkpoint | particles | h (latent²) × MALA steps | CESS target | path points | resamplings | "
              "distinct ancestors | acceptance | ESS/n (torch FF) | ESS/n (OpenMM) | u 5/50/95 % raw (kT, OpenMM) | "
              "u 5/50/95 % weighted | max \\|u_torch − u_OpenMM\\| (kT) | time |\n|" + "---|" * 14)
    print(header)
    print(row)
    print("ESS history (every 20th point):", " ".join(f"{e:.2f}" for e in out["ess_history"][::20]))
    if args.out:
        path = Path(args.out)
        new = not path.exists()
        with path.open("a") as f:
            if new:
                f.write(header + "\n")
            f.write(row + "\n")


if __name__ == "__main__":
    main()
