"""Tabulate `bash bench/ess_vs_size.sh` and extrapolate its ESS to the proteins' sizes (issue 20).

Reads, per sequence, ``bench/results/ess_vs_size/<SEQ>/report.json`` (``bg analyze``: Kish ESS/n with its 95 %
bootstrap interval, energies) and ``bench/runs/ess_vs_size/<SEQ>/times.txt`` (wall times), counts the model's free
coordinates D the way the flows do (reduced internal coordinates, rigid rings, bonds to H frozen), and writes a
markdown table.

The extrapolation reads each ESS/n as a log-normal spread of the log weights, σ² = ln(n / ESS), and fits
σ² = c·D through the origin (least squares over the sequences whose ESS is above the floor of one effective sample,
where σ² is only a lower bound). Independent errors per coordinate add up that way; long-range contacts, which the
peptides lack, can only add to it. The same fit then gives the ESS/n expected at the proteins' D and the c a
protein would need for ESS/n ≥ 1e-3.

    python bench/ess_vs_size.py --out bench/results/ess_vs_size.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROTEINS = {"villin 1VII": "villin_1vii.pdb", "protein G 1PGA": "protein_g_1pga.pdb"}
#: D of the proteins on their configs' representation, counted here on 2026-12-07 (used when ../shared is absent)
PROTEIN_DIM = {"villin 1VII": 929, "protein G 1PGA": 1390}
TARGET_ESS = 1e-3


def free_coordinates(spec: str) -> tuple[int, int]:
    """(atoms, D) of a system on the NSF configs' representation with bonds to hydrogen constrained."""
    from bg.coordinates.internal import InternalCoordinates
    from bg.systems.builtin import get_system

    system = get_system(spec, forcefield="amber14-obc2", constraints="hbonds")
    rep = InternalCoordinates(system.topology, reduced=True, rigid_rings=True, frozen_bonds=system.constrained_bonds())
    return system.topology.n_atoms, rep.dim


def log_weight_variance(ess_fraction: float) -> float:
    """σ² of a log-normal weight distribution whose Kish ESS/n is ``ess_fraction`` (n/ESS = exp σ²)."""
    return math.log(1.0 / ess_fraction)


def fit_slope(points: list[tuple[int, float]]) -> float:
    """Least-squares c of σ² = c·D through the origin."""
    return sum(d * s for d, s in points) / sum(d * d for d, _ in points)


def fit_power(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (a, k) of log σ² = log a + k·log D (σ² = a·D^k), from two points or more."""
    xs = [math.log(d) for d, _ in points]
    ys = [math.log(v) for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - k * mx), k


def times(path: Path) -> dict[str, int]:
    """Wall seconds per step of ``times.txt``, the longest of its entries (a rerun that found the MD cached reads ~0)."""
    out: dict[str, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            key, value = key.split(" (")[0].strip(), rest.strip().split(" s")[0]
            if value.isdigit():
                out[key] = max(out.get(key, 0), int(value))
    return out


def checkpoint(fit_log: Path) -> Path | None:
    found = [line.split("last checkpoint: ", 1)[1].strip() for line in fit_log.read_text().splitlines()
             if "last checkpoint: " in line] if fit_log.exists() else []
    return ROOT / found[-1] if found else None


def log_weight_spread(ckpt: Path, n: int, seed: int = 0) -> tuple[float, float]:
    """(robust sd, sd) of log w = −u − log q over ``n`` flow samples, u from the model's own (torch) energy."""
    import torch

    from bench.log_weight_spread import robust
    from bg.models.loading import load_generator

    torch.manual_seed(seed)
    model = load_generator(ckpt)
    with torch.no_grad():
        log_w = model.proposal.weigh(n, model.energy)["log_w"].double()
    finite = log_w[torch.isfinite(log_w)]
    return robust(log_w)[1], float(finite.std())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", nargs="+", default=["A", "AAA", "AAAAAA"])
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results/ess_vs_size")
    ap.add_argument("--runs", type=Path, default=ROOT / "bench/runs/ess_vs_size")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared/data")
    ap.add_argument("--spread", type=int, default=2000,
                    help="flow samples per checkpoint for the log-weight spread (torch force field); 0: skip")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    rows, points = [], []
    for seq in args.sequences:
        report = args.results / seq / "report.json"
        if not report.exists():
            print(f"{seq}: no {report} (run bash bench/ess_vs_size.sh {seq})", file=sys.stderr)
            continue
        rep = json.loads(report.read_text())
        n = rep["n_samples"]
        ess = rep["sampling"]["ess"]
        energies = rep["structure"]["energies_kT"] if "structure" in rep else {}
        atoms, dim = free_coordinates(f"peptide:{seq}")
        sigma2 = log_weight_variance(ess["value"])
        floored = ess["value"] * n < 1.5
        if not floored:
            points.append((dim, sigma2))
        t = times(args.runs / seq / "times.txt")
        ckpt = checkpoint(args.runs / seq / "fit.log")
        sd = log_weight_spread(ckpt, args.spread) if args.spread and ckpt is not None else None
        gen = energies.get("generator", {}).get("median")
        ref = energies.get("reference on the model's coordinates", {}).get("median")
        rows.append((f"Ace-{seq}-Nme", atoms, dim, n, rep["energy"], ess, sigma2, floored, gen, ref,
                     t.get("training"), t.get("MD"), sd))

    if not rows:
        raise SystemExit("no reports: run bash bench/ess_vs_size.sh first")
    lines = [
        "# ESS against molecule size, one CPU recipe (issue 20)",
        "",
        f"Machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} cores, torch on CPU). Data, training and judging: "
        "`bash bench/ess_vs_size.sh` (2 ns of constrained 4 fs MD per peptide, `configs/aldp_nsf.yaml` on reduced "
        "internal coordinates with bonds to H frozen, `bg analyze` with OpenMM energies). Table: "
        "`python bench/ess_vs_size.py --out bench/results/ess_vs_size.md`.",
        "",
        "| molecule | atoms | D (free coordinates) | samples | energy | Kish ESS/n (95 %) | σ² = ln(n/ESS) | σ²/D | "
        f"log w robust sd / sd ({args.spread:,} samples, torch FF) | "
        "median u: samples / MD on the model's coordinates (kT) | training (s) | MD (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, atoms, dim, n, energy, ess, sigma2, floored, gen, ref, train_s, md_s, sd in rows:
        bound = "≥ " if floored else ""
        med = f"{gen:.1f} / {ref:.1f}" if gen is not None and ref is not None else "–"
        lines.append(f"| {name} | {atoms} | {dim} | {n:,} | {energy} | {ess['value']:.4g} ({ess['low']:.3g}–"
                     f"{ess['high']:.3g}) | {bound}{sigma2:.2f} | {bound}{sigma2 / dim:.4f} | "
                     f"{f'{sd[0]:.2f} / {sd[1]:.2f}' if sd else '–'} | {med} | "
                     f"{train_s or '–'} | {md_s or '–'} |")
    lines.append("")
    if points:
        c = fit_slope(points)
        power = fit_power(points) if len({d for d, _ in points}) > 1 else None
        lines += [f"Fit σ² = c·D over {len(points)} peptide(s) above the floor: **c = {c:.4f} nats² per coordinate** "
                  "(independent errors per coordinate, the recipe's per-coordinate quality held)."]
        if power:
            lines.append(f"Fit σ² = a·D^k (log-log least squares): **a = {power[0]:.3g}, k = {power[1]:.2f}** (the "
                         "per-coordinate quality of one recipe falling with size).")
        lines += ["", "| protein | D | c needed for ESS/n ≥ 1e-3 | σ² = c·D | ESS/n at c | σ² = a·D^k | log-w sd at a·D^k |",
                  "|---|---|---|---|---|---|---|"]
        for name, pdb in PROTEINS.items():
            path = args.shared / pdb
            dim = free_coordinates(str(path))[1] if path.exists() else PROTEIN_DIM[name]
            need = log_weight_variance(TARGET_ESS) / dim
            cells = (f"{power[0] * dim ** power[1]:,.0f} | {math.sqrt(power[0] * dim ** power[1]):.0f} nats"
                     if power else "– | –")
            lines.append(f"| {name} | {dim} | {need:.4f} ({c / need:.1f}× below the fitted c) | {c * dim:.1f} | "
                         f"{math.exp(-c * dim):.2g} | {cells} |")
    else:
        lines.append("Every peptide sits at the floor of one effective sample: no fit.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
