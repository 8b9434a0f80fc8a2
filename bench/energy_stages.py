"""ESS against wall time for maximum likelihood and each energy stage, at equal budget.

Trains the alanine dipeptide generator of a config (any family: the model's ``class_path``) with a fixed
mix of loss terms for a wall-clock budget (from scratch, or continuing a checkpoint), evaluating ESS/n of
``--samples`` flow samples judged by the torch force field every ``--eval-every`` seconds of training
(evaluation time is not counted).
One row per call is appended to a JSON-lines file; ``--table`` renders the file as Markdown.

    python bench/energy_stages.py --config configs/aldp_nsf.yaml --terms nll=1 --lr 1e-3 \\
        --minutes 12 --save bench/runs/stages/ml.ckpt --out bench/runs/stages/rows.jsonl --label ML
    python bench/energy_stages.py --config configs/aldp_nsf.yaml --init bench/runs/stages/ml.ckpt \\
        --terms kl_path=1,nll=0.1 --lr 1e-4 --minutes 4 --out bench/runs/stages/rows.jsonl --label "path KL"
    python bench/energy_stages.py --table bench/runs/stages/rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bg  # noqa: E402
from bg.analysis import backbone_pairs, phi_psi  # noqa: E402
from bg.metrics import DistanceDistortion, pairwise_distances  # noqa: E402
from bg.sampling.ess import kish_ess  # noqa: E402
from bench.log_weight_spread import robust  # noqa: E402
from bench.md_reference import datamodule  # noqa: E402


def data_and_model(config: Path, init: Path | None, model_options: dict | None = None,
                   data_options: dict | None = None):
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["init_args"].update(model_options or {})
    cfg["data"]["init_args"].update(data_options or {})
    dm = datamodule(cfg["data"]["init_args"])
    dm.prepare_data()
    dm.setup("fit")
    if init is not None:
        model = bg.load_generator(init)
    else:
        from lightning.pytorch.cli import instantiate_class

        model = instantiate_class((), cfg["model"])
        model.build(dm.system, dm.positions["train"])
    return cfg, dm, model


def distortion_reader(model, frames: torch.Tensor) -> Callable[[torch.Tensor], float] | None:
    """ΔD (nm) of generated frames ``(B, N, 3)`` against the mean heavy-backbone distances of MD ``frames``;
    ``None`` for a molecule with too few backbone atoms."""
    try:
        pairs = backbone_pairs(model.system.topology)
    except ValueError:
        return None
    reference_mean = pairwise_distances(frames.double(), pairs).mean(0)

    def read(x: torch.Tensor) -> float:
        meter = DistanceDistortion(reference_mean)
        meter.update(pairwise_distances(x.double(), pairs))
        return float(meter.compute())

    return read


@torch.no_grad()
def ess(model, n: int, seed: int, readings: dict[str, list] | None = None,
        distortion: Callable[[torch.Tensor], float] | None = None) -> float:
    """ESS/n of ``n`` flow samples (torch force field). Given ``readings``, appends to its lists what moves while
    ESS/n sits at 1/n on a protein: ``phi_positive``, the raw φ > 0 fraction; ``energies``, the 5 % and 50 %
    energy quantiles (kT); ``log_w_sd``, the spread of the finite log weights as a robust standard
    deviation (interquartile range / 1.349, nats: a few clashing samples at 1e9 kT would swamp a plain one;
    lognormal weights have ESS/n = exp(−sd²)); and with ``distortion`` (:func:`distortion_reader`), ``distortion``, the raw ΔD (nm; whether a stage keeps
    the fold)."""
    torch.manual_seed(seed)
    model.eval()
    out = model.proposal.weigh(n, model.energy)
    model.train()
    if readings is not None:
        phi, _ = phi_psi(out["x"], model.system.topology)
        readings["phi_positive"].append(round(float((phi > 0).double().mean()), 4))
        u = out["energy_kT"].double().nan_to_num(math.inf)
        readings["energies"].append([float(torch.quantile(u, 0.05)), float(torch.quantile(u, 0.5))])
        readings["log_w_sd"].append(round(robust(out["log_w"])[1], 2))
        if distortion is not None:
            readings["distortion"].append(round(distortion(out["x"]), 4))
    return float(kish_ess(out["log_w"]))  # already per sample


def speed_options(model, precision: str | None, compile_splines: bool) -> None:
    """Set the flow's training-speed options (``conditioner_precision``, ``compile_splines``), which change no
    weights, on a new or loaded generator (a checkpoint's own are otherwise kept)."""
    from bg.flows import SplineCoupling

    for module in model.modules():
        if precision is not None and hasattr(module, "precision"):
            module.precision = precision
        if compile_splines and isinstance(module, SplineCoupling):
            module.compile_spline = True
    # Only families that have these options record them: a TarFlow's saved hparams must stay its own init
    # arguments, or the checkpoint no longer loads.
    if precision is not None and "conditioner_precision" in model.hparams:
        model.hparams.conditioner_precision = precision
    if "compile_splines" in model.hparams:
        model.hparams.compile_splines = model.hparams.compile_splines or compile_splines


def parse_terms(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in (item.split("=") for item in text.split(","))}


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    options = {k: yaml.safe_load(v) for k, v in (item.split("=") for item in args.model.split(";"))} if args.model else {}
    if options and args.init:
        raise SystemExit("--model sets the options of a new flow; a checkpoint given by --init keeps its own "
                         "(--kl-batch-size applies to both)")
    data = {k: yaml.safe_load(v) for k, v in (item.split("=") for item in args.data.split(";"))} if args.data else {}
    cfg, dm, model = data_and_model(Path(args.config), Path(args.init) if args.init else None, options, data)
    if args.kl_batch_size:
        model.hparams.kl_batch_size = args.kl_batch_size
    if args.w2_atoms:
        model.use_w2_atoms(args.w2_atoms)
    speed_options(model, args.conditioner_precision, args.compile_splines)
    terms = parse_terms(args.terms)
    model.check_loss_weights(terms)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    batch = cfg["data"]["init_args"].get("batch_size", 256)
    x = dm.positions["train"]
    budget = args.minutes * 60.0
    distortion = distortion_reader(model, dm.positions["val"])
    readings: dict[str, list] = {"phi_positive": [], "energies": [], "log_w_sd": [], "distortion": []}
    curve = [(0.0, 0, model.energy_evaluations, ess(model, args.samples, args.seed, readings, distortion))]

    def shown() -> str:
        u = readings["energies"][-1]
        dd = f" ΔD {readings['distortion'][-1]:.3f} nm" if distortion is not None else ""
        return f"u 5 %/50 % {u[0]:.4g}/{u[1]:.4g} kT log w sd {readings['log_w_sd'][-1]:.4g}{dd}"

    print(f"[{args.label}] t=0 ESS/n {curve[0][3]:.4f} {shown()}", flush=True)
    trained, step, next_eval = 0.0, 0, args.eval_every
    while trained < budget:
        t0 = time.perf_counter()
        lr = args.lr_end + 0.5 * (args.lr - args.lr_end) * (1 + math.cos(math.pi * min(trained / budget, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(x), (batch,))
        opt.zero_grad()
        loss, _ = model.weighted_loss(x[idx], terms)
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
        step += 1
        trained += time.perf_counter() - t0
        if trained >= next_eval or trained >= budget:
            next_eval += args.eval_every
            curve.append((round(trained, 1), step, model.energy_evaluations,
                          ess(model, args.samples, args.seed + step, readings, distortion)))
            print(f"[{args.label}] t={trained:.0f}s step {step} energy evals {model.energy_evaluations} "
                  f"ESS/n {curve[-1][3]:.4f} raw φ>0 {readings['phi_positive'][-1]:.4f} {shown()}", flush=True)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        import lightning as L

        ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": L.__version__}
        model.on_save_checkpoint(ckpt)  # the molecule, class and format, as a Trainer would write them
        torch.save(ckpt, args.save)
    return {"label": args.label, "terms": terms, "data": data, "lr": args.lr, "kl_batch_size": model.hparams.kl_batch_size,
            "w2_atoms": model.hparams.get("w2_atoms", "backbone"),
            "conditioner_precision": model.hparams.get("conditioner_precision", "float32"),
            "compile_splines": model.hparams.get("compile_splines", False), "init": args.init, "curve": curve,
            **{k: v or None for k, v in readings.items()},
            "command": "python bench/energy_stages.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}


def fmt_ess(e: float) -> str:
    """Three decimals, or two significant figures below 0.01 (a TarFlow's 2e-4 is not 0.000)."""
    return f"{e:.3f}" if e >= 0.01 else f"{e:.1e}"


def energy_range(row: dict) -> str:
    u = row.get("energies")  # rows written before the column existed have none
    return f"{u[0][0]:.3g} / {u[0][1]:.3g} → {u[-1][0]:.3g} / {u[-1][1]:.3g}" if u else "–"


def start_end(row: dict, key: str, fmt: str) -> str:
    values = row.get(key)  # rows written before the column existed have none
    return f"{values[0]:{fmt}} → {values[-1]:{fmt}}" if values else "–"


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = [f"Machine: {platform.node()} ({torch.get_num_threads()} torch threads, no GPU), torch {torch.__version__}; "
           "ESS/n of flow samples judged by the torch force field; wall time of training only.", "",
           "| stage | terms (weights) | lr | start ESS/n | ESS/n after (wall s: ESS/n) | energy evaluations | best | raw φ>0 start → end | u 5 % / 50 % (kT) start → end | log w robust sd (nats) start → end | ΔD (nm) start → end |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["curve"]
        pts = ", ".join(f"{t:.0f}: {fmt_ess(e)}" for t, _, _, e in c[1:])
        best = max(e for *_, e in c)
        out.append(f"| {r['label']} | {', '.join(f'{k} {v:g}' for k, v in r['terms'].items())} | {r['lr']:g} | "
                   f"{fmt_ess(c[0][3])} | {pts} | {c[-1][2]:,} | {fmt_ess(best)} | {start_end(r, 'phi_positive', '.3f')} | {energy_range(r)} | {start_end(r, 'log_w_sd', '.3g')} | {start_end(r, 'distortion', '.3f')} |")
    out += ["", "Commands:", ""] + [f"- {r['label']}: `{r['command']}`" for r in rows]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/aldp_nsf.yaml")
    p.add_argument("--init", default=None, help="checkpoint to continue (default: a new flow from the config)")
    p.add_argument("--model", default="", help="model options over the config's, e.g. 'coupling_masks=shuffled;bins=12'")
    p.add_argument("--data", default="", help="data options over the config's, e.g. 'training_states=[0, 1]'")
    p.add_argument("--terms", default="nll=1", help="loss terms and weights, e.g. kl_path=1,nll=0.1")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-end", type=float, default=None, help="cosine decay to this (default: lr / 10)")
    p.add_argument("--clip", type=float, default=100.0)
    p.add_argument("--conditioner-precision", choices=("float32", "bfloat16"), default=None,
                   help="the conditioners' hidden layers while training (default: the flow's own)")
    p.add_argument("--compile-splines", action="store_true", help="torch.compile the couplings' splines")
    p.add_argument("--kl-batch-size", type=int, default=None, help="flow samples per energy-term estimate")
    p.add_argument("--w2-atoms", choices=("backbone", "polar", "heavy"), default=None,
                   help="whose distances the w2 term matches (default: the flow's own; applies to --init too)")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--eval-every", type=float, default=60.0, help="seconds of training between ESS evaluations")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="run")
    p.add_argument("--save", default=None, help="write the trained generator's checkpoint here")
    p.add_argument("--out", default=None, help="append the row (JSON lines)")
    p.add_argument("--table", default=None, help="render a JSON-lines file as Markdown and exit")
    args = p.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return
    if args.lr_end is None:
        args.lr_end = args.lr / 10
    row = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
