"""φ > 0 population and statistical inefficiency of generated alanine dipeptide datasets (MD or replica
exchange), to compare data generators: how many effective frames each delivers, and whether the rare
basins are in it.

    python bench/data_statistics.py md=data/aldp/md replica_exchange=data/aldp/replica_exchange \\
        --out bench/results/aldp_data.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import mdtraj as md
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bg.systems import MolecularSystem, trajectory_files  # noqa: E402
from bg.systems.replica_exchange import frame_files, phi_positive, statistical_inefficiency  # noqa: E402


def blocks(path: Path) -> tuple[list[np.ndarray], dict]:
    """φ > 0 indicator per independent trajectory (one MD run, or each replica-exchange walker) and metadata."""
    system = MolecularSystem.load(path)
    if (path / "replica_exchange.json").exists():
        files, meta = frame_files(path), json.loads((path / "replica_exchange.json").read_text())["settings"]
        interval = meta["steps_per_iteration"] * meta["timestep_fs"] / 1000
        return [phi_positive(md.load(str(f), top=system.topology).xyz, system.topology) for f in files], \
            {"interval_ps": interval, "kind": f"replica exchange, {meta['walkers']} walkers × {meta['n_replicas']} replicas"}
    meta = json.loads((path / "md.json").read_text())["settings"]
    xyz = md.load([str(f) for f in trajectory_files(path)], top=system.topology).xyz
    return [phi_positive(xyz, system.topology)], {"interval_ps": meta["steps_per_frame"] * meta["timestep_fs"] / 1000,
                                                  "kind": "one Langevin trajectory"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="label=directory")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = [f"Machine: {platform.node()} (2 CPU cores). Command: `python bench/data_statistics.py {' '.join(args.dirs)}`", "",
             "| data | generator | frames (interval) | φ>0 population (per trajectory) | statistical inefficiency g of φ>0 (frames) | effective frames | φ>0 in the first 80 % / last 20 % (the train / held-out blocks) |",
             "|---|---|---|---|---|---|---|"]
    for item in args.dirs:
        label, path = item.split("=", 1)
        parts, meta = blocks(Path(path))
        every = np.concatenate(parts).astype(float)
        g = max(statistical_inefficiency(p.astype(float)) for p in parts)
        cut = int(0.8 * len(every))
        lines.append(f"| {label} | {meta['kind']} | {len(every)} ({meta['interval_ps']:g} ps) | {every.mean():.4f} "
                     f"({', '.join(f'{p.mean():.4f}' for p in parts)}) | {g:.1f} | {len(every) / g:.0f} | "
                     f"{every[:cut].mean():.4f} / {every[cut:].mean():.4f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
