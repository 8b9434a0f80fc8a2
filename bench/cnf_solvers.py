"""Equivariant CNF: what an ODE solver setting costs and what it does to log q (issue 18, item 3).

Every setting integrates the *same* prior draws (one seeded generator per batch) from t = 0 to 1 with the
exact divergence, so each sample can be compared with the reference setting's sample from the same x₀:

- seconds per 1,000 samples with log q and function evaluations (NFE) per solve;
- the samples' displacement from the reference's (RMS over atoms, nm);
- the log q error against the reference: mean, sd and largest |error − mean| (nats). A constant offset cancels
  in self-normalised importance weights; the spread does not: for small errors ESS/n shrinks by about
  exp(−sd²) (log-normal weights);
- ESS/n of each setting's own importance weights over the same draws (``--energy``), the number that matters.

Settings are ``METHOD:VALUE``: adaptive solvers (dopri5, bosh3, ...) take ``rtol`` (= atol), fixed-step ones
(euler, midpoint, rk4) take the number of steps over [0, 1]. The reference is the configs' sampler
(``dopri5:1e-4``) unless ``--reference`` says otherwise.

    python bench/cnf_solvers.py --checkpoint runs/bg/<id>/checkpoints/last.ckpt --samples 200 \\
        --settings rk4:4 rk4:8 midpoint:8 dopri5:1e-3 --out bench/results/cnf_solvers.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bg  # noqa: E402
from bg.energy import target_energy  # noqa: E402
from bg.flows import ODESolver  # noqa: E402
from bg.flows.cnf import AdaptiveMethod  # noqa: E402
from bg.metrics import kish_ess  # noqa: E402
from bg.sampling.proposal import batched  # noqa: E402


def parse_setting(text: str) -> ODESolver:
    """``"dopri5:1e-4"`` (adaptive: rtol = atol) or ``"rk4:8"`` (fixed-step: steps) → ``ODESolver``."""
    method, _, value = text.partition(":")
    if not value:
        raise ValueError(f"solver setting {text!r}: write METHOD:RTOL (adaptive) or METHOD:STEPS (fixed-step)")
    if method in get_args(AdaptiveMethod):
        return ODESolver(method, rtol=float(value), atol=float(value))
    return ODESolver(method, steps=int(value))


@dataclass
class Draw:
    """One setting's samples over all batches: frames x ``(n, N, 3)`` nm, log q ``(n,)``, log w ``(n,)``."""

    x: torch.Tensor
    log_q: torch.Tensor
    log_w: torch.Tensor
    seconds: float
    nfe: list[int]


def draw(model, solver: ODESolver, n: int, batch: int, energy, seed: int) -> Draw:
    """``n`` samples with the exact divergence under ``solver``; batch k starts from the prior draw of
    generator seed ``seed + k`` (the same x₀ for every setting). The family's checks apply (mirrored frames
    replace inverted ones; dropped samples weigh zero)."""
    flow, density = model.flow, model.density
    xs, log_qs, nfe, seconds = [], [], [], 0.0
    for k, start in enumerate(range(0, n, batch)):
        size = min(batch, n - start)
        t0 = time.perf_counter()
        y1, log_q_flow = flow.sample(size, solver=solver, generator=torch.Generator().manual_seed(seed + k))
        seconds += time.perf_counter() - t0
        nfe.append(flow.last_nfe)
        x, log_det = density.representation.inverse(y1.double())
        log_q = log_q_flow.double() - log_det
        xs.append(x)
        log_qs.append(log_q)
    x, log_q = torch.cat(xs), torch.cat(log_qs)
    x, log_q, flags = model.check_samples(x, log_q)
    with torch.no_grad():
        u = batched(energy, x, batch)
    log_w = -u - log_q
    if "valid" in flags:
        log_w = log_w.masked_fill(~flags["valid"], -math.inf)
    return Draw(x, log_q, log_w, seconds, nfe)


def compare(row: Draw, ref: Draw) -> dict[str, float]:
    """Displacement (nm, RMS over atoms, mean over samples) and log q error statistics against ``ref``."""
    rms = (row.x - ref.x).square().sum(-1).mean(-1).sqrt()
    err = row.log_q - ref.log_q
    spread = err - err.mean()
    return dict(rms=float(rms.mean()), rms_max=float(rms.max()), err_mean=float(err.mean()),
                err_sd=float(err.std()), err_max=float(spread.abs().max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--settings", nargs="+", required=True, metavar="METHOD:VALUE")
    parser.add_argument("--reference", default="dopri5:1e-4", metavar="METHOD:VALUE")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100, help="samples per ODE solve")
    parser.add_argument("--energy", choices=["openmm", "torch"], default="openmm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model = bg.load_generator(args.checkpoint)
    energy = model.energy if args.energy == "torch" else target_energy(model.system, backend="openmm", n_workers=0)
    labels = [args.reference] + [s for s in args.settings if s != args.reference]
    draws: dict[str, Draw] = {}
    for label in labels:
        solver = parse_setting(label)
        draws[label] = draw(model, solver, args.samples, args.batch, energy, args.seed)
        d = draws[label]
        print(f"{label}: {d.seconds / args.samples * 1000:.1f} s per 1,000, NFE {d.nfe}, "
              f"ESS/n {float(kish_ess(d.log_w)):.4f}", flush=True)

    ref = draws[args.reference]
    cmd = "python bench/cnf_solvers.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"Machine: {platform.node()} ({os.cpu_count()} CPU cores), torch {torch.__version__}. Command: `{cmd}`", "",
             f"Checkpoint `{args.checkpoint}`; {args.samples} samples per setting from the same prior draws, in "
             f"batches of {args.batch}; exact divergence; ESS/n of each setting's own weights, {args.energy} "
             f"energies. Errors against the reference `{args.reference}` (log q error: setting − reference, nats).",
             "", "| setting | NFE per solve | s per 1,000 | RMS shift (nm): mean / max | log q error: mean / sd / "
             "max dev | ESS/n | ESS/n × exp(−sd²) of the reference |", "|---|---|---|---|---|---|---|"]
    ref_ess = float(kish_ess(ref.log_w))
    for label, d in draws.items():
        c = compare(d, ref)
        ess = float(kish_ess(d.log_w))
        nfe = f"{min(d.nfe)}–{max(d.nfe)}" if min(d.nfe) != max(d.nfe) else str(d.nfe[0])
        lines.append(f"| `{label}`{' (reference)' if d is ref else ''} | {nfe} | {d.seconds / args.samples * 1000:.1f} | "
                     f"{c['rms']:.2e} / {c['rms_max']:.2e} | {c['err_mean']:+.3f} / {c['err_sd']:.3f} / "
                     f"{c['err_max']:.3f} | {ess:.4f} | {ref_ess * math.exp(-c['err_sd'] ** 2):.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    # Here and not in main(): the tests call main() inside a pytest worker, whose thread count must stay 1.
    torch.set_num_threads(os.cpu_count() or 1)
    main()
