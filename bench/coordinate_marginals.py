"""Which internal coordinates does a flow get wrong? Per-coordinate spread and shift of flow samples
against the training data.

For every internal coordinate of an NSF generator: the standard deviation of ``--samples`` flow samples
over that of the training frames (torsions: of the angle difference to the data's circular mean), and
the shift of the mean in units of the data's standard deviation. A ratio far from 1 in a narrow
coordinate costs importance weights a lot: a Gaussian twice as wide as the target has a KL of 0.32
nats per coordinate. This is how the over-wide sibling-relative dihedrals of alanine dipeptide were
found (bench/results/aldp_marginals.md).

    python bench/coordinate_marginals.py --checkpoint label=path [--checkpoint ...] --out bench/results/aldp_marginals.md
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bg  # noqa: E402
from bg.coordinates.geometry import circular_mean, wrap_angle  # noqa: E402
from energy_stages import data_and_model  # noqa: E402


def centred(z: Tensor, circular: Tensor, centre: Tensor) -> Tensor:
    """Torsions as the wrapped difference to ``centre``; other coordinates unchanged."""
    return torch.where(circular, wrap_angle(z - centre), z)


@torch.no_grad()
def marginals(model, data: torch.Tensor, n: int, seed: int) -> list[dict]:
    """Rows (coordinate, kind, std ratio, shift in data std) for every internal coordinate."""
    torch.manual_seed(seed)
    rep = model.representation
    x, _ = model.sample(n)
    zq = rep.forward(x.double())[0]
    zd = torch.cat([rep.forward(c.double())[0] for c in data.split(4096)])
    circular = rep.is_torsion
    centre = torch.where(circular, circular_mean(zd), 0.0)
    zq, zd = centred(zq, circular, centre), centred(zd, circular, centre)
    rows = []
    for i, entry in enumerate(rep.coordinate_table()):
        sd = zd[:, i].std()
        rows.append(dict(index=i, kind=entry["kind"], atoms="–".join(entry["atoms"]),
                         ratio=float(zq[:, i].std() / sd), shift=float((zq[:, i].mean() - zd[:, i].mean()) / sd)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, help="label=path (repeatable)")
    ap.add_argument("--config", default="configs/aldp_nsf.yaml", help="the data the generators were trained on")
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--tolerance", type=float, default=0.1, help="flag |ratio − 1| or |shift| above this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    _, dm, _ = data_and_model(Path(args.config), None)
    data = dm.positions["train"]
    tables = {}
    for spec in args.checkpoint:
        label, path = spec.split("=", 1)
        tables[label] = marginals(bg.load_generator(path), data, args.samples, args.seed)
    labels = list(tables)
    first = tables[labels[0]]
    lines = [f"Machine: {platform.node()} (CPU, torch {torch.__version__}). Command: "
             f"`python bench/coordinate_marginals.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`", "",
             f"{args.samples} flow samples per generator against {len(data)} training frames; std ratio = "
             "std(samples) / std(data), shift = (mean(samples) − mean(data)) / std(data). Coordinates where any "
             f"generator is off by more than {args.tolerance:g} (ratio or shift):", "",
             "| # | kind | atoms | " + " | ".join(f"{lab}: std ratio / shift" for lab in labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    for i, row in enumerate(first):
        off = [abs(t[i]["ratio"] - 1) > args.tolerance or abs(t[i]["shift"]) > args.tolerance for t in tables.values()]
        if any(off):
            cells = " | ".join(f"{t[i]['ratio']:.2f} / {t[i]['shift']:+.2f}" for t in tables.values())
            lines.append(f"| {i} | {row['kind']} | {row['atoms']} | {cells} |")
    for label, rows in tables.items():
        n_off = sum(abs(r["ratio"] - 1) > args.tolerance or abs(r["shift"]) > args.tolerance for r in rows)
        worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
        lines.append(f"\n{label}: {n_off} of {len(rows)} coordinates off; widest mismatch {worst['atoms']} "
                     f"({worst['kind']}, std ratio {worst['ratio']:.2f}).")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(f"# Per-coordinate marginals of flow samples vs training data\n\n{text}\n")


if __name__ == "__main__":
    main()
