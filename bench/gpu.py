"""Each family on one device in a few minutes: a training step, sampling with log q, and the torch force field.

For the split-channel NSF, TarFlow and the equivariant CNF on alanine dipeptide, at the sizes of
``configs/aldp_<family>.yaml`` layered with ``configs/gpu/aldp_<family>.yaml`` (or tiny sizes with ``--toy``):

- a training step (forward, backward, optimiser step) of the family's first loss term at the data batch size
  of the config: NSF and TarFlow maximum likelihood (−log q of MD frames), the CNF flow matching;
- for the NSF and TarFlow, a step of the energy stage of the alanine-dipeptide recipes (``logvar`` + ``alpha2``:
  ``kl_batch_size`` flow samples and the data batch through the torch force field and log q), the step that
  sets the cost of the long recipe;
- sampling with exact log q (``model.sample``) at the config's sample batch size, in samples per second;
- the reduced energy of those samples under the batched torch force field on the same device, frames per second;
- the device's peak memory (CUDA only).

Frames come from a short OpenMM MD run made here (seconds), so the script needs nothing but the package.

    python bench/gpu.py --out bench/results/gpu.md          # CUDA when present, else the CPU
    python bench/gpu.py --toy --device cpu                  # tiny sizes: the check that runs in the tests
    python bench/gpu.py --no-overlay --families nsf --base nsf=configs/aldp_nsf_long.yaml   # a CPU recipe

A family that fails is reported in the table (its error) and the others still run; the table is rewritten
after each family, so a run stopped part-way leaves what it measured.

Every figure is a median over ``--repeats`` timed runs after one warm-up, with the device synchronised (fewer
repeats where the warm-up alone took over ``--budget`` seconds).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
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
#: the energy stage of configs/aldp_nsf_long.yaml (aldp_nsf.yaml's is ``logvar`` alone, at the same cost: ``alpha2``
#: shares its draw); timed for TarFlow too, whose config has none; the CNF has no energy stage
ENERGY_STAGE = {"logvar": 1.0, "alpha2": 1.0}


def merged_config(family: str, toy: bool, base: Path | None = None, overlay: bool = True) -> dict:
    """``base`` (default: configs/aldp_<family>.yaml) with the GPU overlay on top (``toy``: tiny sizes instead;
    ``overlay=False``: the base as it is, with the torch force field)."""
    config = yaml.safe_load((base or ROOT / "configs" / f"aldp_{family}.yaml").read_text())
    if toy:
        layer = {"model": {"init_args": dict(TOY[family], energy_backend="torch")},
                 "data": {"init_args": {"batch_size": TOY_BATCH}}}
    elif overlay:
        layer = yaml.safe_load((ROOT / "configs" / "gpu" / f"aldp_{family}.yaml").read_text())
    else:
        layer = {"model": {"init_args": {"energy_backend": "torch"}}}
    for section in ("model", "data"):
        config[section]["init_args"].update(layer.get(section, {}).get("init_args", {}))
    return config


def build_model(config: dict):
    """The config's generator, instantiated as LightningCLI would (nested classes included)."""
    from jsonargparse import ArgumentParser

    from bg.models import BoltzmannGenerator

    parser = ArgumentParser()
    parser.add_subclass_arguments(BoltzmannGenerator, "model")
    return parser.instantiate(parser.parse_object({"model": config["model"]})).model


def timed(fn: Callable[[], object], device: torch.device, repeats: int, budget: float = 60.0) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up (as many as fit in ``budget``
    seconds by the warm-up's time, at least one)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    fn()
    sync()
    repeats = max(1, min(repeats, int(budget / max(time.perf_counter() - start, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(family: str, config: dict, frames: torch.Tensor, system, device: torch.device, repeats: int,
            n_samples: int | None, budget: float = 60.0) -> dict:
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
    row["train step (s)"] = timed(step, device, repeats, budget)
    if family != "cnf":
        row["kl batch"] = int(model.hparams.kl_batch_size)

        def energy_step() -> None:
            optimizer.zero_grad()
            model.weighted_loss(x, ENERGY_STAGE)[0].backward()
            optimizer.step()

        row["energy step (s)"] = timed(energy_step, device, repeats, budget)
    model.eval()
    n = n_samples or int(config["model"]["init_args"]["sample_batch_size"])
    drawn = {}

    def draw() -> None:
        with torch.no_grad():
            drawn["x"], drawn["log_q"] = model.sample(n, batch_size=n)

    row["samples"] = n
    row["samples/s with log q"] = n / timed(draw, device, repeats, budget)
    assert torch.isfinite(drawn["log_q"]).all(), f"{family}: non-finite log q"
    with torch.no_grad():
        row["energy frames/s"] = n / timed(lambda: model.energy(drawn["x"]), device, repeats, budget)
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


def table(rows: list[dict], device: torch.device, args, argv: list[str], seconds: float) -> str:
    """The Markdown table of ``rows`` (a family that failed shows its error), with the device and the command."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    keys = list(dict.fromkeys(k for row in rows for k in row if k not in ("family", "error")))
    sizes = ("toy (--toy)" if args.toy else
             ", ".join(str(Path(b).relative_to(ROOT)) if Path(b).is_relative_to(ROOT) else b
                       for b in args.base.values()) + (" (no GPU overlay)" if args.no_overlay else
                                                       " + configs/gpu/aldp_<family>.yaml"))
    lines = [f"Device: {device} ({name}), torch {torch.__version__}; sizes: {sizes}; median of up to "
             f"{args.repeats} after a warm-up; {seconds:.0f} s in all.", "",
             "| family | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]

    def cell(value) -> str:
        return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else f"{value:,}"

    for row in rows:
        if "error" in row:
            lines.append(f"| {row['family']} | failed: {row['error']} |" + " |" * (len(keys) - 1))
        else:
            lines.append(f"| {row['family']} | " + " | ".join(cell(row.get(k)) for k in keys) + " |")
    lines += ["", f"Command: `python bench/gpu.py {shlex.join(argv)}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--toy", action="store_true", help="tiny sizes (a CPU check of the script itself)")
    parser.add_argument("--base", action="append", default=[], metavar="FAMILY=CONFIG",
                        help="the family's config under the overlay (default: configs/aldp_<family>.yaml)")
    parser.add_argument("--no-overlay", action="store_true",
                        help="measure the base configs at their own sizes (a CPU recipe on the device)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of timed repeats per figure, judged by the warm-up (at least one repeat)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per sampling run (default: the config's sample_batch_size; CNF: 1,000)")
    parser.add_argument("--frames", type=int, default=1000, help="MD frames to train on")
    parser.add_argument("--out", default=None, help="Markdown file for the table (default: print only)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    bases = dict(item.split("=", 1) for item in args.base)
    if set(bases) - set(FAMILIES):
        parser.error(f"--base: families are {', '.join(FAMILIES)}")
    args.base = {f: str(Path(bases.get(f, ROOT / "configs" / f"aldp_{f}.yaml")).resolve()) for f in args.families}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")

    start = time.time()
    system, frames = short_md(64 if args.toy else args.frames)
    rows = []
    for family in args.families:
        n = TOY_SAMPLES if args.toy else args.samples or (1000 if family == "cnf" else None)
        config = merged_config(family, args.toy, Path(args.base[family]), overlay=not args.no_overlay)
        try:
            rows.append(measure(family, config, frames, system, device, args.repeats, n, args.budget))
        except Exception as error:  # one family's failure must not lose the others' figures on a leased device
            traceback.print_exc()
            rows.append({"family": family, "error": f"{type(error).__name__}: {error}".replace("|", "/")[:200]})
        print(f"{family}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in rows[-1].items() if k != "family"), flush=True)
        text = table(rows, device, args, argv, time.time() - start)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("# Training step, sampling and energies on one device (issue 18, item 4)\n\n"
                                      + text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
