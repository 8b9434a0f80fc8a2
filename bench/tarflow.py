"""TarFlow on alanine dipeptide: proposal vs importance-reweighted vs SMC samples against held-out MD.

Loads a trained checkpoint (``bg fit --config configs/aldp_tarflow.yaml``), draws ``--samples``
proposal samples with log q (timed), reweights them (ESS/n, also with each centre-of-mass
correction: gaussian / chi3 / none on the same samples), runs annealed-Langevin SMC on
``--smc-particles`` fresh proposal particles, and compares each set with the test split of the MD:
energy W2 (kT; energies above the highest MD energy + 20 kT count as that value, as in the training
evaluation), φ/ψ torsion W2 (rad, periodic, mean of φ and ψ), ΔD (nm) and φ/ψ basin populations,
next to the MD-vs-MD floor (val vs test). Writes a Markdown table.

    python bench/tarflow.py --checkpoint runs/.../best-epoch=35.ckpt --data-config configs/aldp_tarflow.yaml \\
        --train-minutes 27.5 --out bench/results/tarflow_aldp.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bg  # noqa: E402
from bench.md_reference import compare, load_reference, mala_relaxed  # noqa: E402
from bg.analysis import BASINS, basin_populations, torsions  # noqa: E402
from bg.coordinates import COM_CORRECTIONS, centred  # noqa: E402
from bg.metrics import circular_w2_1d, kish_ess  # noqa: E402
from bg.sampling import SMCSampler  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-config", default="configs/aldp_tarflow.yaml")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--smc-particles", type=int, default=1000)
    parser.add_argument("--smc-steps", type=int, nargs="+", default=[100], help="path points K (one SMC run each)")
    parser.add_argument("--langevin-steps", type=int, default=1)
    parser.add_argument("--step-size", type=float, nargs="+", default=[1e-6],
                        help="SMC Langevin step size(s), nm² (one SMC run each)")
    parser.add_argument("--ula", action="store_true", help="unadjusted Langevin (default: MALA)")
    parser.add_argument("--schedule", choices=["linear", "adaptive"], default="linear",
                        help="SMC path: K evenly spaced points, or adaptive (at most K; bg.sampling.SMCSampler)")
    parser.add_argument("--target-cess", type=float, default=0.95, help="conditional ESS/n per adaptive step")
    parser.add_argument("--space", choices=["data", "latent", "both"], default="data",
                        help="SMC particles in Cartesian nm or in the flow's latent space (step sizes in its units²); "
                             "both: a latent move of --latent-step-size, then a Cartesian one of --step-size")
    parser.add_argument("--latent-step-size", type=float, help="latent units² (--space both)")
    parser.add_argument("--md-relax-steps", type=int, default=0,
                        help="also move the MD val frames by this many exact MALA steps (h = 2e-6 nm²) and compare them: "
                             "what an exact sampler of the force field reads against the MD")
    parser.add_argument("--train-minutes", type=float, help="training time to print in the table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)

    model = bg.load_generator(args.checkpoint)
    dm, ref = load_reference(args.data_config, model)
    val = dm.positions["val"].double()
    phi_q, psi_q = ref["phi_q"], ref["psi_q"]

    # proposal samples with log q, timed; the Cartesian flow's samples are kept to compare CoM corrections
    framed = getattr(model, "framed", False)  # body-frame TarFlow: no CoM, nothing to correct
    t0 = time.time()
    with torch.no_grad():
        if framed:
            x, log_q = model.sample(args.samples)
        else:
            parts = [model.flow.net_sample(min(model.sample_batch_size, args.samples - i))
                     for i in range(0, args.samples, model.sample_batch_size)]
            xf, lqf = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            x = centred(xf * model.scale)
    t_sample = time.time() - t0
    with torch.no_grad():
        u = torch.cat([model.energy(c) for c in x.split(2000)])
    ess_by_com = {}
    if not framed:
        log_scale = model.representation.log_scale(xf)
        ess_by_com = {kind: float(kish_ess(-u - (lqf - model.flow.com_log_density(xf, kind) - log_scale)))
                      for kind in COM_CORRECTIONS}
        log_q = lqf - model.flow.com_log_density(xf) - log_scale
    log_w = -u - log_q
    angles_val = torch.cat([torsions(val, phi_q), torsions(val, psi_q)], 1)
    with torch.no_grad():
        u_val = torch.cat([model.energy(c) for c in val.split(2000)])
    relaxed = None
    if args.md_relax_steps:  # an exact sampler's view of the MD: every row also gets its energy W2 to these frames
        with torch.enable_grad():
            relaxed = mala_relaxed(val, model.energy, args.md_relax_steps)
        ref["u_exact"] = relaxed[1]
        print(f"MD val mean u {float(u_val.mean()):.2f} kT; after {args.md_relax_steps} MALA steps "
              f"{float(relaxed[1].mean()):.2f} kT; MD test {float(ref['u'].mean()):.2f} kT", flush=True)
    rows = {"proposal (raw)": compare(x, u, None, ref),
            "importance-reweighted": compare(x, u, log_w, ref)}
    rows["MD val (floor)"] = compare(val, u_val, None, ref)
    rows["MD val (floor)"]["torsion_w2"] = float(circular_w2_1d(angles_val, ref["angles"]).mean())
    if relaxed is not None:
        rows[f"MD val after {args.md_relax_steps} exact MALA steps (acceptance {relaxed[2]:.2f})"] = compare(
            relaxed[0], relaxed[1], None, ref)

    smc_stats = {}
    for k_steps, h in [(k, h) for k in args.smc_steps for h in args.step_size]:
        sampler = SMCSampler(n_steps=k_steps, langevin_steps=args.langevin_steps, step_size=h,
                             metropolis=not args.ula, batch_size=1000, schedule=args.schedule,
                             target_cess=args.target_cess, space=args.space, latent_step_size=args.latent_step_size)
        t0 = time.time()
        out = sampler(model.proposal, model.energy, args.smc_particles,
                      generator=torch.Generator().manual_seed(args.seed), progress=True)
        unit = {"data": "nm²", "latent": "latent units²"}.get(
            args.space, f"nm² after latent moves of {args.latent_step_size} latent units²")
        label = (f"SMC K={k_steps}, h={h:g} {unit}" if args.schedule == "linear" else
                 f"SMC adaptive (cESS {args.target_cess:g}, {len(out['path'])} points), h={h:g} {unit}")
        smc_stats[label] = dict(time=time.time() - t0, ess=out["ess"], acceptance=out["acceptance"],
                                resamples=len(out["resampled_at"]), rejection=out["rejection_rate"],
                                ancestors=out["n_ancestors"], by_kernel=[out.get("acceptance_latent"),
                                                                         out.get("acceptance_data")])
        rows[label] = compare(out["x"], out["energy_kT"], out["log_w"], ref)

    ess = float(kish_ess(log_w))
    lines = [f"Machine: {platform.node()} ({os.cpu_count()} CPU cores, no GPU), torch {torch.__version__}.", "",
             f"Command: `python {shlex.join(sys.argv)}`", "",
             f"Checkpoint: `{args.checkpoint}`" + (f", trained {args.train_minutes:.1f} min on this machine." if args.train_minutes else "."),
             f"Proposal: {args.samples} samples, **ESS/n = {ess:.4f}** ("
             + ("body frame, no CoM" if framed else f"CoM correction `{model.flow.com_correction}`") + "); "
             f"sampling with log q: {t_sample / args.samples * 1000:.1f} s per 1,000 samples.", "",
             ("ESS/n of the same samples under each centre-of-mass correction (bg/coordinates/com.py): "
              + ", ".join(f"{k} {v:.4f}" for k, v in ess_by_com.items()) + ".") if ess_by_com else
             "The body-frame representation removes rigid motions exactly: no centre-of-mass correction.", "",
             "Against the MD test split (energy W2 and mean energy in kT with energies capped at max(MD) + 20 kT; torsion W2 in rad,"
             " periodic, mean of φ and ψ; ΔD in nm). Held-out blocks of finite MD differ in their rare basins, so the"
             " torsion W2 is also given against the val block, the other held-out block:", "",
             "| samples | energy W2 | mean energy | φ/ψ torsion W2 (test) | φ/ψ torsion W2 (val) | ΔD | basins "
             + " / ".join(BASINS) + " |" + (" energy W2 to the relaxed MD val |" if relaxed is not None else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if relaxed is not None else "")]
    md_test = basin_populations(ref["angles"][:, 0], ref["angles"][:, 1])
    for label, r in rows.items():
        b = " / ".join(f"{r['basins'][k]:.3f}" for k in BASINS)
        exact = f" {r['energy_w2_exact']:.3f} |" if "energy_w2_exact" in r else ""
        lines.append(f"| {label} | {r['energy_w2']:.3f} | {r['mean_energy']:.2f} | {r['torsion_w2']:.3f} | {r['torsion_w2_val']:.3f} | {r['dd']:.4f} | {b} |{exact}")
    test_vs_val = float(circular_w2_1d(ref["angles"], ref["angles_val"]).mean())
    lines.append(f"| MD test (reference) | 0 | {float(ref['u'].mean()):.2f} | 0 | {test_vs_val:.3f} | 0 | "
                 + " / ".join(f"{md_test[k]:.3f}" for k in BASINS) + " |" + (" – |" if relaxed is not None else ""))
    lines += ["", f"SMC: {args.smc_particles} particles, K path points (ending at t = 1), "
              f"{args.langevin_steps} {'ULA' if args.ula else 'MALA'} step(s) each, resampling at ESS < 0.5, "
              "final weights used (no final resampling):", "",
              "| run | time | final ESS/n | acceptance | resamplings | distinct ancestors | energy-cut rejections |",
              "|---|---|---|---|---|---|---|"]
    for label, s in smc_stats.items():
        acc = f"{s['acceptance']:.3f}" if s["acceptance"] is not None else "—"
        if s["by_kernel"][0] is not None:
            acc = f"latent {s['by_kernel'][0]:.3f}, Cartesian {s['by_kernel'][1]:.3f}"
        lines.append(f"| {label} | {s['time']:.0f} s | {s['ess']:.3f} | {acc} | {s['resamples']} | {s['ancestors']} | "
                     f"{s['rejection']:.4f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
