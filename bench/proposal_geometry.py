"""Where a generator's proposals leave the MD energy range: bond lengths by element pair and energy quantiles.

For each checkpoint: ``--samples`` proposal samples (no refinement), their energy quantiles (kT, the
model's target energy) and Kish ESS/n, and per element pair (C–H, C–C, C=O, …) the mean and standard
deviation of the bonded distances (nm) against the same over the MD test split of ``--data-config``.
A proposal whose bonds spread several times wider than thermal motion sits thousands of kT above the
MD, whatever its torsions do; this table tells that case apart from a torsion (basin) mismatch.

    python bench/proposal_geometry.py --checkpoint ml=bench/runs/tarflow_stages/ml.ckpt \\
        --data-config configs/aldp_tarflow.yaml --samples 2000
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bg  # noqa: E402
from bench.md_reference import load_reference  # noqa: E402
from bg.sampling.ess import kish_ess  # noqa: E402


def bond_classes(topology) -> dict[str, list[tuple[int, int]]]:
    """Bonded atom pairs ``(i, j)`` grouped by their sorted element symbols, e.g. ``"C–H"``."""
    groups: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for a, b in topology.bonds:
        groups["–".join(sorted((a.element.symbol, b.element.symbol)))].append((a.index, b.index))
    return dict(sorted(groups.items()))


def spread(x: torch.Tensor, pairs: list[tuple[int, int]]) -> tuple[float, float]:
    """Mean over the pairs of the mean and of the standard deviation over frames of their distance (nm)."""
    i, j = torch.tensor(pairs).T
    d = (x[:, i] - x[:, j]).norm(dim=-1)
    return float(d.mean()), float(d.std(0).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="label=path (repeatable)")
    p.add_argument("--data-config", default="configs/aldp_tarflow.yaml")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows, md_row, classes = [], None, None
    for item in args.checkpoint:
        label, _, path = item.rpartition("=")
        model = bg.load_generator(path)
        model.eval()
        if md_row is None:
            dm, _ = load_reference(args.data_config, model)
            classes = bond_classes(model.topology)
            md_row = {k: spread(dm.positions["test"].double(), v) for k, v in classes.items()}
        torch.manual_seed(args.seed)
        with torch.no_grad():
            out = model.proposal.weigh(args.samples, model.energy)
        x = out["x"].double()
        with torch.no_grad():
            u = torch.cat([model.energy(c) for c in x.split(2000)])
        q = torch.quantile(u, torch.tensor([0.05, 0.5, 0.95], dtype=u.dtype))
        rows.append((label or path, float(kish_ess(out["log_w"])), q.tolist(),
                     {k: spread(x, v) for k, v in classes.items()}))
    names = list(classes)
    print(f"Machine: {platform.node()} ({torch.get_num_threads()} torch threads), torch {torch.__version__}; "
          f"{args.samples} proposal samples per checkpoint, energies from the model's target (kT).\n")
    print("| samples | ESS/n | u 5 % / 50 % / 95 % (kT) | " + " | ".join(f"{n} mean ± sd (nm)" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for label, ess, q, by_class in rows:
        cells = " | ".join(f"{by_class[n][0]:.4f} ± {by_class[n][1]:.4f}" for n in names)
        print(f"| {label} | {ess:.1e} | {q[0]:.3g} / {q[1]:.3g} / {q[2]:.3g} | {cells} |")
    cells = " | ".join(f"{md_row[n][0]:.4f} ± {md_row[n][1]:.4f}" for n in names)
    print(f"| MD test split | – | – | {cells} |")
    print("\nCommand: `python bench/proposal_geometry.py " + " ".join(
        f"--checkpoint {c}" for c in args.checkpoint) + f" --data-config {args.data_config} --samples {args.samples}`")


if __name__ == "__main__":
    main()
