"""Where the spread of the log importance weights comes from: u against log q, per checkpoint.

For ``--samples`` flow samples of each checkpoint, the median and robust standard deviation (interquartile
range / 1.349) of the energy u (kT, torch force field), of log q and of log w = −u − log q (nats), beside the
log q of the MD validation frames on the model's coordinates. Lognormal weights have ESS/n = exp(−sd²): ESS/n ≥ 1e-3
needs a log-w spread of ≲ 2.6 nats. A flow whose samples have a much higher log q than the MD frames has
contracted (mode-seeking); one whose u spread dominates still strains or clashes.

``--terms`` adds, per checkpoint, each force-field term (kT, torch force field) over the samples and over the MD
frames on the model's coordinates, and its correlation with log w over the samples without clashes (log w within
``--clash-nats`` of the median): which term strains, and which one sets the weights.

    python bench/log_weight_spread.py --config configs/hp35_nsf.yaml CKPT [CKPT ...] --terms --out bench/results/x.md
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bg  # noqa: E402
from bench.md_reference import datamodule  # noqa: E402
from bg.energy import target_energy  # noqa: E402


def robust(values: torch.Tensor) -> tuple[float, float]:
    """Median and interquartile range / 1.349 of the finite ``values``."""
    v = values.double()
    v = v[torch.isfinite(v)]
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return float(q[1]), float(q[2] - q[0]) / 1.349


#: force kinds whose energies are pair interactions (direct and through the implicit solvent)
NONBONDED = ("NonbondedForce", "CustomGBForce", "GBSAOBCForce")


@torch.no_grad()
def spread(model, frames: torch.Tensor, n: int, seed: int, terms: bool = False,
           clash_nats: float = 50.0) -> dict:
    """Median and robust sd of u, log q and log w over ``n`` samples, and of log q over MD ``frames`` (B, N, 3) nm.

    With ``terms``: ``"terms"`` maps each force-field term to (samples' median, robust sd; the MD frames' on the
    model's coordinates; Pearson correlation of the term with log w over the samples whose log w lies within
    ``clash_nats`` of the median), energies in kT; with a force field of several non-bonded forces, also their sum
    (named by joining theirs with " + ")."""
    torch.manual_seed(seed)
    model.eval()
    out = model.proposal.weigh(n, model.energy)
    on_model = model.on_model_coordinates(frames.double())
    log_q_md = model.density.log_prob(on_model)
    result = {"u": robust(out["energy_kT"]), "log_q": robust(out["log_q"]), "log_w": robust(out["log_w"]),
              "log_q_md": robust(log_q_md)}
    if terms:
        energy = target_energy(model.system, backend="torch")
        per_sample = energy.energy_terms(out["x"].double())
        per_frame = energy.energy_terms(on_model)
        for per in (per_sample, per_frame):  # Coulomb and implicit solvent cancel largely: their sum too
            nonbonded = [k for k in per if k.startswith(NONBONDED)]
            if len(nonbonded) > 1:
                per[" + ".join(nonbonded)] = sum(per[k] for k in nonbonded)
        log_w = out["log_w"].double()
        kept = torch.isfinite(log_w) & (log_w > result["log_w"][0] - clash_nats)
        result["terms"] = {}
        for name, v in per_sample.items():
            v = v.double() / energy.kT
            both = torch.stack([v[kept], log_w[kept]])
            corr = float(torch.corrcoef(both)[0, 1]) if int(kept.sum()) > 2 else math.nan
            result["terms"][name] = (robust(v), robust(per_frame[name].double() / energy.kT), corr)
        result["kept"] = int(kept.sum())
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--config", default="configs/hp35_nsf.yaml", help="the config whose data the models were trained on")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--frames", type=int, default=500, help="MD validation frames for the data's log q")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--terms", action="store_true", help="also each force-field term over samples and MD frames")
    p.add_argument("--clash-nats", type=float, default=50.0,
                   help="with --terms: correlations over samples whose log w is within this of the median")
    p.add_argument("--out", default=None, help="write the Markdown table here (else print it)")
    args = p.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    dm = datamodule(cfg["data"]["init_args"])
    dm.prepare_data()
    dm.setup("fit")
    frames = dm.positions["val"][: args.frames]
    lines = [f"Machine: {platform.node()} ({torch.get_num_threads()} torch threads, no GPU), torch {torch.__version__}; "
             f"{args.samples:,} flow samples per checkpoint, u from the torch force field; {len(frames)} MD validation "
             "frames. Each cell: median (robust sd = IQR / 1.349).", "",
             "| checkpoint | u (kT) | log q, samples | log w | log q, MD frames |", "|---|---|---|---|---|"]
    by_term = []
    for path in args.checkpoints:
        s = spread(bg.load_generator(path), frames, args.samples, args.seed, args.terms, args.clash_nats)
        cells = " | ".join(f"{m:.4g} ({sd:.3g})" for m, sd in (s["u"], s["log_q"], s["log_w"], s["log_q_md"]))
        lines.append(f"| `{path}` | {cells} |")
        print(lines[-1], flush=True)
        if args.terms:
            by_term += ["", f"Force-field terms of `{path}` (kT, median (robust sd); correlation with log w over the "
                        f"{s['kept']:,} samples whose log w is within {args.clash_nats:g} nats of the median):", "",
                        "| term | samples | MD frames on the model's coordinates | samples − MD (medians) | "
                        "correlation with log w |", "|---|---|---|---|---|"]
            for name, ((m, sd), (m_md, sd_md), corr) in s["terms"].items():
                by_term.append(f"| {name} | {m:.5g} ({sd:.3g}) | {m_md:.5g} ({sd_md:.3g}) | {m - m_md:+.4g} | "
                               f"{corr:+.2f} |")
            print("\n".join(by_term[-len(s["terms"]) - 1:]), flush=True)
    lines += by_term
    lines += ["", "Command: `python bench/log_weight_spread.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "`"]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
