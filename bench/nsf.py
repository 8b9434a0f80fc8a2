"""Split-channel NSF vs the baseline NSF at equal budget, and evaluation of trained checkpoints.

Trains each config through the real CLI (``bg fit``) with the same data, stages (optionally all
stage lengths scaled by ``--epoch-scale``), epochs and seed, then evaluates the last checkpoint on
the held-out test split: NLL (Cartesian, nats), ESS/n of 5,000 samples, ΔD (nm), median energy
(kT), φ/ψ torsion W2 raw and reweighted next to the MD-vs-MD noise floor (val vs test), and for
alanine dipeptide the φ/ψ basin populations. Writes a Markdown table.

    python bench/nsf.py --label split=configs/aldp_nsf.yaml --label baseline=configs/aldp_nsf_baseline.yaml \\
        --epoch-scale 0.3 --out bench/results/nsf_aldp.md
    python bench/nsf.py --evaluate split=runs/.../last.ckpt --data-config configs/aldp_nsf.yaml --out ...
    python bench/nsf.py --label split=configs/hp35_nsf.yaml \
        --label "baseline=configs/hp35_nsf.yaml --model.init_args.split_channels=false \
                 --model.init_args.conditioner=mlp --model.init_args.width=256" --epoch-scale 0.3 --out ...
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bg  # noqa: E402
from bg.analysis import BASINS, backbone_pairs, basin_populations, phi_psi_atoms, torsions  # noqa: E402
from bg.metrics import circular_w2_1d, kish_ess, pairwise_distances  # noqa: E402
from datamodules import MDDataModule  # noqa: E402


def scaled_stages(config: dict, scale: float) -> dict[str, dict]:
    """The config's ``loss.stages`` with every stage length in epochs scaled by ``scale``."""
    stages = (config.get("loss") or {}).get("stages")
    if not stages:
        raise ValueError("the config has no loss.stages")
    stages = {name: dict(s) for name, s in stages.items()}
    for s in stages.values():
        if s.get("epochs"):
            s["epochs"] = max(1, round(s["epochs"] * scale))
    return stages


def train(label: str, config: Path, scale: float, workdir: Path, extra: list[str]) -> tuple[Path, float]:
    base = yaml.safe_load(config.read_text())
    stages = scaled_stages(base, scale)
    epochs = sum(s.get("epochs", 0) for s in stages.values())
    run_dir = workdir / label
    override = dict(loss=dict(stages=stages), trainer=dict(
        max_epochs=epochs + (epochs % 2), enable_progress_bar=False,
        logger=dict(class_path="lightning.pytorch.loggers.CSVLogger", init_args=dict(save_dir=str(run_dir), name="", version="log")),
        callbacks=[dict(class_path="callbacks.SampleEvaluation", init_args=dict(n_samples=1000, figures=False)),
                   dict(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                        init_args=dict(dirpath=str(run_dir / "ckpt"), save_last=True))]))
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "override.yaml"
    path.write_text(yaml.safe_dump(override, sort_keys=False))  # stage order matters
    start = time.time()
    cmd = [sys.executable, "-m", "bg", "fit", "--config", str(config), "--config", str(path), *extra]
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    with open(run_dir / "fit.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                       env=dict(os.environ, WANDB_MODE="disabled"))
    return run_dir / "ckpt" / "last.ckpt", time.time() - start


@torch.no_grad()
def evaluate(ckpt: Path, dm: MDDataModule, n: int = 5000, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = bg.load_generator(ckpt)
    test, val = dm.positions["test"].double(), dm.positions["val"].double()
    nll = -torch.cat([model.log_prob(c) for c in test.split(1000)]).mean().item()
    out = model.proposal.weigh(n, model.energy)
    x, u, log_w = out["x"], out["energy_kT"], out["log_w"]
    top = model.topology
    pairs = backbone_pairs(top)
    dd = (pairwise_distances(x, pairs).mean(0) - pairwise_distances(test, pairs).mean(0)).abs().mean().item()
    u_test = torch.cat([model.energy(c) for c in test.split(1000)])
    phi_q, psi_q = phi_psi_atoms(top)

    def angles(frames):
        return torch.cat([torsions(frames, phi_q), torsions(frames, psi_q)], 1)

    a_gen, a_test, a_val = angles(x), angles(test), angles(val)
    ok = torch.isfinite(log_w)
    w = torch.softmax(torch.where(ok, log_w, torch.full_like(log_w, -torch.inf)), 0)
    row = dict(nll=nll, ess=kish_ess(log_w).item(), dd=dd, median_u=u[torch.isfinite(u)].median().item(),
               median_u_md=u_test.median().item(), finite=ok.double().mean().item(),
               tw2=circular_w2_1d(a_gen, a_test).mean().item(),
               tw2_rw=circular_w2_1d(a_gen, a_test, w).mean().item(),
               tw2_floor=circular_w2_1d(a_val, a_test).mean().item())
    if phi_q.shape[0] == 1:
        train = dm.positions["train"].double()
        for name, frames, lw in (("md_train", train, None), ("md_test", test, None), ("raw", x, None), ("reweighted", x, log_w)):
            a = angles(frames)
            row[f"basins_{name}"] = basin_populations(a[:, 0], a[:, 1], lw)
    return row


def markdown(rows: dict[str, dict], times: dict[str, float], command: str, note: str) -> str:
    lines = [f"Machine: {platform.node()} ({os.cpu_count()} CPU cores, no GPU), torch {torch.__version__}.",
             "", f"Command: `{command}`", "", note, "",
             "| model | train time | test NLL (nats) | ESS/n | ΔD (nm) | median u (kT) [MD] | finite | φ/ψ W2 raw | φ/ψ W2 reweighted | MD-vs-MD floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        t = f"{times[label] / 60:.1f} min" if label in times else "—"
        lines.append(f"| {label} | {t} | {r['nll']:.2f} | {r['ess']:.3f} | {r['dd']:.4f} | {r['median_u']:.1f} "
                     f"[{r['median_u_md']:.1f}] | {r['finite']:.3f} | {r['tw2']:.3f} | {r['tw2_rw']:.3f} | {r['tw2_floor']:.3f} |")
    basin_rows = [(label, r) for label, r in rows.items() if "basins_raw" in r]
    if basin_rows:
        lines += ["", "φ/ψ basin populations (" + ", ".join(BASINS) + "):", "",
                  "| model | " + " | ".join(f"{k}" for k in ("MD train", "MD test", "raw samples", "reweighted")) + " |",
                  "|---|---|---|---|---|"]
        for label, r in basin_rows:
            cells = [" / ".join(f"{r[f'basins_{k}'][b]:.4f}" for b in BASINS) for k in ("md_train", "md_test", "raw", "reweighted")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", action="append", default=[],
                        help="'label=config.yaml [--cli.override=value ...]' to train and evaluate")
    parser.add_argument("--evaluate", action="append", default=[], help="label=checkpoint to evaluate only")
    parser.add_argument("--data-config", help="config whose data section to evaluate on (default: first --label)")
    parser.add_argument("--epoch-scale", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--workdir", default="bench/runs")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", required=True)
    parser.add_argument("extra", nargs="*", help="extra CLI overrides passed to every bg fit (after --)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    pairs = []
    for item in args.label:
        label, rest = item.split("=", 1)
        config, *overrides = rest.split()
        pairs.append((label, config, overrides))
    evals = [s.split("=", 1) for s in args.evaluate]
    data_config = Path(args.data_config or pairs[0][1])
    data = yaml.safe_load(data_config.read_text())["data"]["init_args"]
    extra_data = {}
    for item in args.extra:
        if item.startswith("--data.init_args."):
            key, value = item[len("--data.init_args."):].split("=", 1)
            extra_data[key] = yaml.safe_load(value)
    dm = MDDataModule(**{**data, **extra_data})
    dm.prepare_data()
    dm.setup()
    times, ckpts = {}, {}
    for label, config, overrides in pairs:
        ckpts[label], times[label] = train(label, ROOT / config, args.epoch_scale, ROOT / args.workdir,
                                           overrides + args.extra)
    ckpts.update({label: Path(path) for label, path in evals})
    rows = {label: evaluate(path, dm, args.samples) for label, path in ckpts.items()}
    command = "python " + shlex.join(sys.argv)
    text = markdown(rows, times, command, args.note)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
