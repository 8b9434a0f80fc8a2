"""Each family on one device in a few minutes: a training step, sampling with log q, and the torch force field.

For the split-channel NSF, TarFlow and the equivariant CNF on alanine dipeptide, at the sizes of
``configs/aldp_<family>.yaml`` layered with ``configs/gpu/aldp_<family>.yaml`` (or tiny sizes with ``--toy``):

- a training step (forward, backward, optimiser step) of the family's first loss term at the data batch size
  of the config: NSF and TarFlow maximum likelihood (−log q of MD frames), the CNF flow matching;
- sampling with exact log q (``model.sample``) at the config's sample batch size, in samples per second;
- the reduced energy of those samples under the batched torch force field on the same device, frames per second;
- the device's peak memory (CUDA only).

Frames come from a short OpenMM MD run made here (seconds), so the script needs nothing but the package.

    python bench/gpu.py --out bench/results/gpu.md          # CUDA when present, else the CPU
    python bench/gpu.py --toy --device cpu                  # tiny sizes: the check that runs in the tests

Every figure is a median over ``--repeats`` timed runs after one warm-up, with the device synchronised.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = ("nsf", "tarflow", "cnf")
#: the family's first loss term and the sizes that make it small enough for a CPU test
TOY = {
    "nsf": dict(width=16, backbone_layers=2, sidechain_layers=2, bins=6, depth=1, attention_dim=8),
    "tarflow": dict(channels=16, blocks=2, layers=1, heads=2),
    "cnf": dict(hidden=8, layers=1, solver="rk4", steps=2),
}
TOY_BATCH, TOY_SAMPLES = 32, 16


def merged_config(family: str, toy: bool) -> dict:
    """The CPU config with the GPU overlay on top (``toy``: the CPU config with tiny sizes instead)."""
    config = yaml.safe_load((ROOT / "configs" / f"aldp_{family}.yaml").read_text())
    overlay = {"model": {"init_args": dict(TOY[family], energy_backend="torch")},
               "data": {"init_args": {"batch_size": TOY_BATCH}}} if toy else \
        yaml.safe_load((ROOT / "configs" / "gpu" / f"aldp_{family}.yaml").read_text())
    for section in ("model", "data"):
        config[section]["init_args"].update(overlay.get(section, {}).get("init_args", {}))
    return config


def build_model(config: dict):
    """The config's generator, instantiated as LightningCLI would (nested classes included)."""
    from jsonargparse import ArgumentParser

    from bg.models import BoltzmannGenerator

    parser = ArgumentParser()
    parser.add_subclass_arguments(BoltzmannGenerator, "model")
    return parser.instantiate(parser.parse_object({"model": config["model"]})).model


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(family: str, config: dict, frames: torch.Tensor, system, device: torch.device, repeats: int,
            n_samples: int | None) -> dict:
    torch.manual_seed(0)
    model = build_model(config)
    model.build(system, frames)
    model.to(device)
    batch = int(config["data"]["init_args"]["batch_size"])
    x = frames[torch.randint(0, len(frames), (batch,))].to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def loss() -> torch.Tensor:
        return model.term_flow_matching(x) if family == "cnf" else -model.log_prob(x).mean()

    def step() -> None:
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {"family": family, "params": sum(p.numel() for p in model.parameters()), "batch": batch}
    model.train()
    row["train step (s)"] = timed(step, device, repeats)
    model.eval()
    n = n_samples or int(config["model"]["init_args"]["sample_batch_size"])
    drawn = {}

    def draw() -> None:
        with torch.no_grad():
            drawn["x"], drawn["log_q"] = model.sample(n, batch_size=n)

    row["samples"] = n
    row["samples/s with log q"] = n / timed(draw, device, repeats)
    assert torch.isfinite(drawn["log_q"]).all(), f"{family}: non-finite log q"
    with torch.no_grad():
        row["energy frames/s"] = n / timed(lambda: model.energy(drawn["x"]), device, repeats)
    if device.type == "cuda":
        row["peak memory (GiB)"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def short_md(n_frames: int):
    """Alanine dipeptide and ``n_frames`` frames of OpenMM MD (float64 nm), made in a temporary folder."""
    from bg.systems import MDSettings, aldp, load_md, simulate

    system = aldp()
    with tempfile.TemporaryDirectory() as out:
        simulate(system, out, MDSettings(n_frames=n_frames, steps_per_frame=100, equilibration_steps=1000,
                                         chunk_frames=n_frames), progress=False)
        frames = torch.as_tensor(load_md(out).xyz, dtype=torch.float64)
    return system, frames


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--toy", action="store_true", help="tiny sizes (a CPU check of the script itself)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per sampling run (default: the config's sample_batch_size; CNF: 1,000)")
    parser.add_argument("--frames", type=int, default=1000, help="MD frames to train on")
    parser.add_argument("--out", default=None, help="Markdown file for the table (default: print only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")

    start = time.time()
    system, frames = short_md(64 if args.toy else args.frames)
    rows = []
    for family in args.families:
        n = TOY_SAMPLES if args.toy else args.samples or (1000 if family == "cnf" else None)
        rows.append(measure(family, merged_config(family, args.toy), frames, system, device, args.repeats, n))
        print(f"{family}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in rows[-1].items() if k != "family"), flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    keys = [k for k in rows[0] if k != "family"]
    lines = [f"Device: {device} ({name}), torch {torch.__version__}; sizes: "
             f"{'toy (--toy)' if args.toy else 'configs/aldp_<family>.yaml + configs/gpu/aldp_<family>.yaml'}; "
             f"median of {args.repeats} after a warm-up; {time.time() - start:.0f} s in all.", "",
             "| family | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in rows:
        cells = [f"{row[k]:.3g}" if isinstance(row[k], float) else f"{row[k]:,}" for k in keys]
        lines.append(f"| {row['family']} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `python bench/gpu.py {shlex.join(argv if argv is not None else sys.argv[1:])}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# Training step, sampling and energies on one device (issue 18, item 4)\n\n" + text)
    return rows


if __name__ == "__main__":
    main()
