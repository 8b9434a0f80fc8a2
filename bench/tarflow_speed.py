"""TarFlow sampling speed: seconds per 1,000 samples with log q (the autoregressive inverse), at the sizes of
configs/aldp_tarflow.yaml (22 atom tokens, 4 blocks × 2 layers × 128 channels), against the implementation
at another git revision on the same machine in the same run, and the round-trip error of the current one.
Also the cost of what an energy-based stage (reverse KL) pays per step: a reparameterised batch of
``--kl-batch`` samples with log q and the backward pass through it, next to a maximum-likelihood step.

    python bench/tarflow_speed.py --compare-rev 2f8c1a0 --out bench/results/tarflow_speed.md

The weights are random (std 0.05, far from the identity): speed does not depend on training, and the
round trip forward(inverse(z)) = z checks that the faster inverse is still the exact inverse.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bg.flows.tarflow import TarFlow  # noqa: E402


def flow_at_revision(rev: str) -> type:
    """The ``TarFlow`` class of ``bg/flows/tarflow.py`` at git revision ``rev`` (its imports resolve to today's bg)."""
    source = subprocess.run(["git", "show", f"{rev}:bg/flows/tarflow.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"tarflow_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TarFlow


def seconds_per_1000(flow: TarFlow, z: torch.Tensor, repeats: int) -> float:
    """Best of ``repeats`` wall times of ``flow.inverse(z)``, scaled to 1,000 samples."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            flow.inverse(z)
            best = min(best, time.perf_counter() - start)
    return best * 1000 / len(z)


def grad_seconds(flow: TarFlow, n: int, repeats: int) -> float:
    """Best wall time of drawing ``n`` reparameterised samples with log q and back-propagating through them."""
    best = float("inf")
    for _ in range(repeats):
        flow.zero_grad()
        start = time.perf_counter()
        x, log_q = flow.sample(n)
        (x.square().sum() + log_q.sum()).backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/aldp_tarflow.yaml")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kl-batch", type=int, default=128, help="samples per reparameterised batch (kl_batch_size)")
    parser.add_argument("--ml-batch", type=int, default=256, help="frames per maximum-likelihood step (data batch)")
    parser.add_argument("--compare-rev", default=None, help="git revision whose inverse to time beside today's")
    parser.add_argument("--out", default=None, help="Markdown file to write (default: print only)")
    args = parser.parse_args()

    sizes = yaml.safe_load((ROOT / args.config).read_text())["model"]["init_args"]
    kwargs = {k: sizes[k] for k in ("channels", "blocks", "layers", "heads", "mlp_ratio", "max_log_scale")}
    torch.manual_seed(0)
    flow = TarFlow(22, 3, **kwargs)
    for p in flow.parameters():
        torch.nn.init.normal_(p, std=0.05)
    z = torch.randn(args.samples, 22, 3)
    rows = [("this revision (KV cache)", seconds_per_1000(flow, z, args.repeats), grad_seconds(flow, args.kl_batch, args.repeats))]
    if args.compare_rev:
        old = flow_at_revision(args.compare_rev)(22, 3, **kwargs)
        old.load_state_dict(flow.state_dict())
        rows.append((f"revision {args.compare_rev}", seconds_per_1000(old, z, args.repeats),
                     grad_seconds(old, args.kl_batch, args.repeats)))
        with torch.no_grad():
            agree = float((old.inverse(z)[0] - flow.inverse(z)[0]).abs().max())
    x_ml = torch.randn(args.ml_batch, 22, 3)
    start = time.perf_counter()
    (-flow.log_prob(x_ml).mean()).backward()
    ml_step = time.perf_counter() - start
    with torch.no_grad():
        x, log_det = flow.inverse(z)
        z_back, log_det_fwd = flow(x)
    lines = [f"Machine: {platform.node() or 'unknown'} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), "
             f"torch {torch.__version__}; float32; {args.samples} samples, best of {args.repeats}.", "",
             f"| inverse | sampling with log q, s per 1,000 samples | reparameterised batch of {args.kl_batch} + backward, s |",
             "|---|---|---|"]
    lines += [f"| {name} | {sec:.2f} | {grad:.2f} |" for name, sec, grad in rows]
    lines += ["", f"A maximum-likelihood step (log q of {args.ml_batch} frames + backward) takes {ml_step:.2f} s with the same flow."]
    lines += ["", f"Round trip: max |forward(inverse(z)) − z| = {float((z_back - z).abs().max()):.1e}, "
                  f"max |log det sum| = {float((log_det + log_det_fwd).abs().max()):.1e}."]
    if args.compare_rev:
        lines.append(f"Samples of the two implementations differ by at most {agree:.1e} (float32 round-off).")
    lines += ["", f"Command: `python bench/tarflow_speed.py {shlex.join(sys.argv[1:])}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text("# TarFlow sampling speed (issue 18, item 3)\n\n" + text)


if __name__ == "__main__":
    main()
