"""Which torsion start (scan temperature T, uniform share) fits the MD of a peptide set's training peptides best.

The transferable NSF starts each rotatable torsion from its rigid force-field scan, exp(−u_scan/T) mixed with a
uniform share ``floor`` (``torsion_prior: scan``). This reads, for every (T, floor) of a grid, the mean
log-likelihood per rotatable torsion of the chosen peptides' MD frames under that start (the cross-entropy
term of KL(MD ‖ start); the MD's own entropy is the same for every setting, so the ranking is the KL's), and
prints it per peptide and on average. Use the training split to choose (``--splits train``): choosing on the
held-out peptides' MD would let their MD decide how they are sampled.

    python bench/torsion_start.py --splits train --out bench/results/torsion_start.md
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bg.coordinates import InternalCoordinates  # noqa: E402
from bg.coordinates.harmonic import harmonic_geometry  # noqa: E402
from bg.energy import target_energy  # noqa: E402
from bg.flows.tabulated import boltzmann_table  # noqa: E402
from bg.systems.peptide import minimize_positions  # noqa: E402
from datamodules import PeptideSetDataModule  # noqa: E402


def torsion_log_likelihood(table: Tensor, angles: Tensor) -> Tensor:
    """Mean log density (per radian) ``(R,)`` of torsion values ``angles`` ``(F, R)`` rad under bin probabilities
    ``table`` ``(R, K)`` over [−π, π)."""
    k = table.shape[-1]
    width = 2 * math.pi / k
    bins = ((angles + math.pi) / width).long().clamp(0, k - 1)
    return (table.gather(1, bins.T) / width).log().mean(-1)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peptide-set", default="configs/peptide_sets/single_residues.yaml")
    ap.add_argument("--cache-dir", default="data")
    ap.add_argument("--splits", default="train", help="comma-separated splits whose MD decides (train, val, test)")
    ap.add_argument("--temperatures", default="1,2,4")
    ap.add_argument("--floors", default="0.05,0.1,0.2")
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    floors = [float(f) for f in args.floors.split(",")]
    grid = [(t, f) for t in temperatures for f in floors]
    dm = PeptideSetDataModule(args.peptide_set, cache_dir=args.cache_dir, stride=args.stride)
    dm.setup("fit")
    t0 = time.time()
    per_peptide: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for split in args.splits.split(","):
        for i, seq in enumerate(dm.split[split.strip()]):
            system = dm.system(seq)
            rep = InternalCoordinates(system.topology)
            energy = target_energy(system, backend="torch", compile=False)
            geometry = harmonic_geometry(rep, energy, minimize_positions(system), scan_points=360)
            z, _ = rep(dm.positions[split.strip()][i].double())
            angles = z[:, geometry.rotatable]
            per_peptide[seq] = [float(torsion_log_likelihood(boltzmann_table(geometry.torsion_energy, t, f), angles).mean())
                                for t, f in grid]
            counts[seq] = int(geometry.rotatable.sum())
            print(seq, counts[seq], " ".join(f"{v:.3f}" for v in per_peptide[seq]), flush=True)
    total = sum(counts.values())
    mean = [sum(per_peptide[s][g] * counts[s] for s in per_peptide) / total for g in range(len(grid))]
    worst = [min(per_peptide[s][g] for s in per_peptide) for g in range(len(grid))]
    best = max(range(len(grid)), key=lambda g: mean[g])
    lines = [f"Machine: {platform.node()} (2 CPU cores), torch {torch.__version__}. Command: `python bench/torsion_start.py "
             f"--peptide-set {args.peptide_set} --splits {args.splits} --temperatures {args.temperatures} --floors "
             f"{args.floors}` ({time.time() - t0:.0f} s).", "",
             f"Mean log-likelihood (nats per rotatable torsion; higher is better) of the MD of {len(per_peptide)} peptides "
             f"({''.join(per_peptide)}; {total} rotatable torsions) under the rigid-scan start exp(−u/T) with a uniform "
             "share; a uniform start reads −log 2π = −1.838.", "",
             "| T | uniform share | mean over torsions | worst peptide (its mean) |", "|---|---|---|---|"]
    lines += [f"| {t:g} | {f:g} | {mean[g]:.3f}{' (best)' if g == best else ''} | {worst[g]:.3f} |"
              for g, (t, f) in enumerate(grid)]
    lines += ["", "| peptide | rotatable torsions | " + " | ".join(f"T {t:g}, {f:g}" for t, f in grid) + " |",
              "|---|---|" + "---|" * len(grid)]
    lines += [f"| Ace-{s}-Nme | {counts[s]} | " + " | ".join(f"{v:.3f}" for v in per_peptide[s]) + " |" for s in per_peptide]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
