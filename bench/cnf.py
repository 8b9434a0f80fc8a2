"""Equivariant CNF on alanine dipeptide: exact-likelihood samples, reweighting hygiene and sampling cost.

Loads a trained checkpoint (``bg fit --config configs/aldp_cnf.yaml``), draws ``--samples`` samples with
log q from the exact divergence (timed, with the number of ODE function evaluations), applies the
chirality / bond-graph checks, and compares proposal and importance-reweighted samples with the test
split of the MD: ESS/n over all samples drawn (dropped ones count as weight zero) and over the kept
ones only, under the model's energy (the torch force field) and under OpenMM (the reference), the wrong-chirality and broken-bond-graph rates, energy W2 (kT; capped at max(MD) + 20 kT),
φ/ψ torsion W2 (rad, periodic, mean of φ and ψ), ΔD (nm) and φ/ψ basin populations; where the excess
energy sits: the median of each force-field term (kT) over kept samples against the MD's, and each bond's
median |z| (length minus the MD's mean, over the MD's sd). With
``--compare label=checkpoint`` the sampling cost (samples + log q, no energies) of other generators is
timed on the same machine for the side-by-side table. Writes a Markdown file.

    python bench/cnf.py --checkpoint bench/runs/cnf/version_0/checkpoints/last.ckpt \\
        --compare tarflow=<ckpt> nsf=<ckpt> --train-minutes 22 --out bench/results/cnf_aldp.md
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
from bench.md_reference import compare, load_reference  # noqa: E402
from bg.analysis import BASINS, basin_populations  # noqa: E402
from bg.energy import target_energy  # noqa: E402
from bg.flows import ODESolver  # noqa: E402
from bg.metrics import circular_w2_1d, kish_ess  # noqa: E402


def time_sampling(model, n: int, batch: int) -> float:
    """Seconds per 1,000 samples with log q (``model.sample``), after one warm-up batch."""
    model.sample(min(batch, 8), min(batch, 8))
    t0 = time.time()
    model.sample(n, batch)
    return (time.time() - t0) / n * 1000


@torch.no_grad()
def geometry_lines(model, x: torch.Tensor, md: torch.Tensor) -> list[str]:
    """Markdown: the median of each torch force-field term (kT) over samples ``x`` and MD frames ``md``
    ``(B, N, 3)`` nm, and bond lengths of the samples as |z| against the MD's per-bond mean and sd."""
    if not len(x):
        return ["", "No kept samples: no geometry table."]
    terms = target_energy(model.system, backend="torch", compile=False).double().energy_terms
    ours, theirs = terms(x), terms(md[:5000])
    lines = ["", "Where the energy sits (median over kept samples / over MD test frames, kT, torch force field):", "",
             "| term | samples | MD | excess |", "|---|---|---|---|"]
    for name in ours:
        a, b = float(ours[name].median()), float(theirs[name].median())
        lines.append(f"| {name.split('[')[0]} | {a:.1f} | {b:.1f} | {a - b:+.1f} |")
    top = model.topology
    bonds = torch.tensor([[a.index, b.index] for a, b in top.bonds])
    length = lambda f: (f[:, bonds[:, 0]] - f[:, bonds[:, 1]]).norm(dim=-1)  # noqa: E731
    ref = length(md)
    z = ((length(x) - ref.mean(0)) / ref.std(0)).abs().median(0).values
    worst = ", ".join(f"{top.atom(int(bonds[i, 0])).name}–{top.atom(int(bonds[i, 1])).name} {float(z[i]):.1f}"
                      for i in z.argsort(descending=True)[:4])
    lines += ["", f"Bond lengths: median |z| (in MD standard deviations) {float(z.mean()):.2f} averaged over the "
              f"{len(bonds)} bonds (an exact sampler: 0.67); largest: {worst}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-config", default="configs/aldp_cnf.yaml")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250, help="samples per ODE solve")
    parser.add_argument("--solver", default=None, help="override the checkpoint's ODE solver: dopri5 | rk4 | ...")
    parser.add_argument("--rtol", type=float, default=None)
    parser.add_argument("--atol", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--compare", nargs="*", default=[], metavar="LABEL=CKPT",
                        help="other generators whose sampling cost to time beside the CNF")
    parser.add_argument("--compare-samples", type=int, default=2000)
    parser.add_argument("--train-minutes", type=float, help="training time to print")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)

    model = bg.load_generator(args.checkpoint)
    ode = model.ode
    model.ode = model.flow.solver = ODESolver(args.solver or ode.method, args.rtol or ode.rtol, args.atol or ode.atol,
                                              args.steps or ode.steps)
    top = model.topology
    dm, ref = load_reference(args.data_config, model)

    parts, nfe = [], []
    t0 = time.time()
    for i in range(0, args.samples, args.batch):
        size = min(args.batch, args.samples - i)
        parts.append(model.proposal.weigh(size, model.energy, batch_size=size))
        nfe.append(model.flow.last_nfe)
        done = i + size
        print(f"{done}/{args.samples} samples, {time.time() - t0:.0f} s, NFE {nfe[-1]}", flush=True)
    t_sample = time.time() - t0
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    x, u, log_w, valid = out["x"], out["energy_kT"], out["log_w"], out["valid"]
    ess_all = float(kish_ess(log_w))
    ess_kept = float(kish_ess(log_w[valid])) if valid.any() else 0.0
    # the same samples judged by OpenMM: dropped samples keep log w = −inf
    openmm_u = target_energy(model.system, backend="openmm", n_workers=0)
    with torch.no_grad():
        u_omm = torch.cat([openmm_u(c) for c in x.split(args.batch)])
    log_w_omm = torch.where(torch.isfinite(log_w), -u_omm - out["log_q"], torch.full_like(log_w, -torch.inf))
    ess_omm = float(kish_ess(log_w_omm))
    agree = torch.isfinite(u_omm) & (u_omm < 100)
    max_du = float((u - u_omm)[agree].abs().max()) if agree.any() else float("nan")
    rows = {"proposal (raw, all)": compare(x, u, None, ref),
            "proposal (kept)": compare(x[valid], u[valid], None, ref),
            "importance-reweighted": compare(x, u, log_w, ref)}

    cost = {"EquivariantCNF (this run)": t_sample / args.samples * 1000}
    for item in args.compare:
        label, ckpt = item.split("=", 1)
        other = bg.load_generator(ckpt)
        cost[label] = time_sampling(other, args.compare_samples, other.sample_batch_size)

    rate = lambda key: float(out[key].double().mean())  # noqa: E731
    s = model.ode
    solver = (f"{s.method}, rtol={s.rtol:g}, atol={s.atol:g}" if s.method in ("dopri5", "dopri8", "bosh3", "adaptive_heun")
              else f"{s.method}, {s.steps} steps")
    lines = [f"Machine: {platform.node()} ({os.cpu_count()} CPU cores, no GPU), torch {torch.__version__}.", "",
             f"Command: `python {shlex.join(sys.argv)}`", "",
             f"Checkpoint: `{args.checkpoint}`"
             + (f", trained {args.train_minutes:.1f} min on this machine." if args.train_minutes else "."),
             f"Sampling: {args.samples} samples in batches of {args.batch}, ODE solver {solver}, exact divergence "
             f"(3N = {3 * top.n_atoms} backward passes per function evaluation); NFE per batch "
             f"{min(nfe)}–{max(nfe)}; {t_sample:.0f} s in all, **{t_sample / args.samples * 1000:.0f} s per 1,000 samples**.",
             "",
             f"**ESS/n = {ess_omm:.4f} (OpenMM energies)**, {ess_all:.4f} (torch force field) over all "
             f"{args.samples} samples (dropped ones weigh zero); {ess_kept:.4f} (torch) over the {int(valid.sum())} "
             f"kept samples only. Largest |u_torch − u_OpenMM| below 100 kT: {max_du:.2g} kT.",
             f"Wrong chirality (before mirroring): {rate('wrong_chirality'):.3f}; mirrored: {rate('mirrored'):.3f}; "
             f"broken bond graph: {rate('broken_topology'):.3f}; kept: {rate('valid'):.3f}.", "",
             "Against the MD test split (energy W2 in kT, energies capped at max(MD) + 20 kT; torsion W2 in rad, "
             "periodic, mean of φ and ψ; ΔD in nm):", "",
             "| samples | energy W2 | φ/ψ torsion W2 (test) | φ/ψ torsion W2 (val) | ΔD | basins "
             + " / ".join(BASINS) + " |",
             "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        b = " / ".join(f"{r['basins'][k]:.3f}" for k in BASINS)
        lines.append(f"| {label} | {r['energy_w2']:.3f} | {r['torsion_w2']:.3f} | {r['torsion_w2_val']:.3f} | "
                     f"{r['dd']:.4f} | {b} |")
    md_test = basin_populations(ref["angles"][:, 0], ref["angles"][:, 1])
    test_vs_val = float(circular_w2_1d(ref["angles"], ref["angles_val"]).mean())
    lines.append(f"| MD test (reference) | 0 | 0 | {test_vs_val:.3f} | 0 | "
                 + " / ".join(f"{md_test[k]:.3f}" for k in BASINS) + " |")
    lines += geometry_lines(model, x[valid], dm.positions["test"].double())
    lines += ["", "Sampling cost with log q on this machine (no energies; CNF: the run above):", "",
              "| generator | s per 1,000 samples |", "|---|---|"]
    lines += [f"| {label} | {c:.1f} |" for label, c in cost.items()]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
