"""Where a dipeptide generator's importance weight goes, basin by basin: its own samples and the MD's frames.

    python bench/basin_weights.py --checkpoint <ckpt> --data-config configs/aldp_tarflow.yaml --samples 20000

For the flow's samples, per φ/ψ basin (bg.analysis.BASINS): the raw fraction, the share of the self-normalised
weight, the median energy u (kT) and the median and largest log w + log n (0 is an average sample's weight).
For the MD training frames at the target temperature, per basin: the median u and the median and 10–90 % range of
log w = −u − log q relative to the median of the most populated basin. A basin whose MD frames read several nats
above the others is one the flow under-covers at the right configurations: its samples there, if any, are
elsewhere (often strained, at high u), and importance sampling gives the basin no weight until the flow learns it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bg  # noqa: E402
from bg.analysis import BASINS, basin_index, phi_psi  # noqa: E402
from md_reference import datamodule  # noqa: E402


@torch.no_grad()
def flow_rows(model, n: int, batch: int) -> list[str]:
    """Table rows of the flow's own samples per basin."""
    x, log_q = model.sample(n, batch_size=batch)
    u = torch.cat([model.energy(c) for c in x.split(batch)])
    phi, psi = phi_psi(x, model.topology)
    basin = basin_index(phi[:, 0], psi[:, 0])
    log_w = -u - log_q
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    rel = log_w - torch.logsumexp(log_w, 0) + math.log(n)  # 0: the weight of an average sample
    rows = []
    for k, name in enumerate(BASINS):
        m = basin == k
        if not m.any():
            rows.append(f"| {name} | 0 | 0 | – | – | – |")
            continue
        rows.append(f"| {name} | {float(m.double().mean()):.4f} | {float(rel[m].exp().sum() / n):.4f} | "
                    f"{float(u[m].median()):.1f} | {float(rel[m].median()):.2f} | {float(rel[m].max()):.2f} |")
    return rows


@torch.no_grad()
def md_rows(model, frames: torch.Tensor, batch: int) -> list[str]:
    """Table rows of MD frames ``(F, N, 3)`` nm per basin, log w relative to the most populated basin."""
    log_q = torch.cat([model.log_prob(c) for c in frames.split(batch)])
    u = torch.cat([model.energy(c) for c in frames.split(batch)])
    phi, psi = phi_psi(frames, model.topology)
    basin = basin_index(phi[:, 0], psi[:, 0])
    log_w = -u - log_q
    top = int(torch.bincount(basin, minlength=len(BASINS)).argmax())
    ref = log_w[basin == top].median()
    rows = []
    for k, name in enumerate(BASINS):
        m = basin == k
        if not m.any():
            rows.append(f"| {name} | 0 | – | – | – |")
            continue
        d = (log_w[m] - ref).double()
        rows.append(f"| {name} | {int(m.sum())} | {float(u[m].median()):.1f} | {float(d.median()):+.2f} | "
                    f"{float(d.quantile(0.1)):+.2f} – {float(d.quantile(0.9)):+.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-config", required=True, help="the config whose data section made the MD")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = bg.load_generator(args.checkpoint)
    data_args = yaml.safe_load((ROOT / args.data_config).read_text())["data"]["init_args"]
    data_args["training_states"] = [0]  # the target temperature's frames only
    dm = datamodule(data_args)
    dm.prepare_data()
    dm.setup()
    print(f"{args.checkpoint}: {args.samples} samples (torch force field), seed {args.seed}\n")
    print("| basin | raw fraction | weight share | median u (kT) | log w + log n: median | max |")
    print("|---|---|---|---|---|---|")
    print("\n".join(flow_rows(model, args.samples, args.batch)))
    frames = dm.positions["train"].double()
    print(f"\nMD training frames at the target temperature ({len(frames)}): log w relative to the median of the most "
          "populated basin\n")
    print("| basin | frames | median u (kT) | log w: median | 10 – 90 % |")
    print("|---|---|---|---|---|")
    print("\n".join(md_rows(model, frames, args.batch)))


if __name__ == "__main__":
    main()
