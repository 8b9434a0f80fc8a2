"""A long replica-exchange reference for alanine dipeptide, independent of the training data (other seed).

Runs (or resumes) ``bg.systems.replica_exchange`` with the ladder of ``configs/aldp_nsf.yaml`` and its own
seed into ``--out-dir`` (kept out of git), then writes ``reference.pt`` there (φ/ψ of every target frame,
the φ > 0 population with its standard error from the statistical inefficiency, the split-half φ/ψ torsion
W2 between the independent walkers: the noise floor) and a Markdown summary.

    python bench/aldp_reference.py --iterations 12000 --out bench/results/aldp_reference.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import mdtraj as md
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bg.analysis import basin_populations, phi_psi_atoms, torsions  # noqa: E402
from bg.metrics import circular_w2_1d  # noqa: E402
from bg.systems import aldp  # noqa: E402
from bg.systems.replica_exchange import (ReplicaExchangeSettings, frame_files, replica_exchange,  # noqa: E402
                                         statistical_inefficiency)


def angles_of(path: Path, topology: md.Topology) -> torch.Tensor:
    """``(F, 2)`` φ, ψ (rad) of a frame file."""
    x = torch.from_numpy(md.load(str(path), top=topology).xyz).double()
    phi_q, psi_q = phi_psi_atoms(topology)
    return torch.cat([torsions(x, phi_q), torsions(x, psi_q)], 1)


def summarize(out_dir: Path) -> dict:
    system = aldp()
    per_walker = [angles_of(f, system.topology) for f in frame_files(out_dir)]
    if len(per_walker) < 2:
        raise ValueError("the reference needs at least two walkers (the split-half floor compares them)")
    every = torch.cat(per_walker)
    positive = (every[:, 0] > 0).double().numpy()
    g = max(statistical_inefficiency((a[:, 0] > 0).double().numpy()) for a in per_walker)
    p = float(positive.mean())
    sigma = float(np.sqrt(p * (1 - p) * g / len(positive)))
    walker_p = [float((a[:, 0] > 0).double().mean()) for a in per_walker]
    half = len(per_walker) // 2
    first, second = torch.cat(per_walker[:half]), torch.cat(per_walker[half:])
    floor = float(circular_w2_1d(first, second).mean())
    return {"frames": len(every), "walkers": len(per_walker), "phi_positive": p, "phi_positive_sigma": sigma,
            "phi_positive_by_walker": walker_p, "statistical_inefficiency_phi_positive": g,
            "split_half_torsion_w2": floor, "basins": basin_populations(every[:, 0], every[:, 1]), "angles": every}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="bench/runs/aldp_reference")
    ap.add_argument("--iterations", type=int, default=12000, help="per walker (one 300 K frame each, 0.5 ps apart)")
    ap.add_argument("--walkers", type=int, default=4, help="independent walkers (more later are added beside the finished ones)")
    ap.add_argument("--seed", type=int, default=1001)
    ap.add_argument("--out", default=None, help="Markdown summary")
    args = ap.parse_args()
    out_dir = ROOT / args.out_dir
    settings = ReplicaExchangeSettings(n_iterations=args.iterations, walkers=args.walkers, seed=args.seed,
                                       block_iterations=500)
    start = time.time()
    replica_exchange(aldp(), out_dir, settings)
    wall = time.time() - start
    ref = summarize(out_dir)
    torch.save(ref, out_dir / "reference.pt")
    report = json.loads((out_dir / "report.json").read_text())
    ns = ref["frames"] * report["frame_interval_ps"] / 1000
    text = "\n".join([
        f"Machine: {platform.node()} (2 CPU cores, no GPU). Command: `python bench/aldp_reference.py "
        f"--iterations {args.iterations} --walkers {args.walkers} --seed {args.seed}` ({wall / 60:.0f} min here; "
        "rerunning only summarises the finished walkers).", "",
        f"Replica exchange (openmmtools), ladder {', '.join(f'{t:.0f}' for t in report['temperatures_K'])} K, "
        f"{args.walkers} independent walkers, seed {args.seed} (the training data use seed 1): "
        f"{ref['frames']} frames at 300 K, {ns:.0f} ns of the target replica in all.", "",
        "| quantity | value |", "|---|---|",
        f"| φ > 0 population | {ref['phi_positive']:.4f} ± {ref['phi_positive_sigma']:.4f} (1σ, statistical "
        f"inefficiency g = {ref['statistical_inefficiency_phi_positive']:.0f} frames) |",
        f"| φ > 0 by walker | {', '.join(f'{p:.4f}' for p in ref['phi_positive_by_walker'])} |",
        f"| split-half φ/ψ torsion W2 (walkers apart; the noise floor) | {ref['split_half_torsion_w2']:.4f} rad |",
        f"| basins ({', '.join(ref['basins'])}) | {' / '.join(f'{v:.4f}' for v in ref['basins'].values())} |",
        f"| neighbour swap acceptance | "
        f"{'; '.join(', '.join(f'{a:.2f}' for a in w['neighbour_acceptance']) for w in report['walkers'])} |",
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
