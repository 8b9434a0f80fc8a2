"""TorchEnergy vs OpenMMEnergy: energies + forces throughput side by side, and float32 accuracy.

    .venv/bin/python bench/torch_energy.py [--villin PDB] [--protein-g PDB] [--out bench/results/torch_energy.md]

For each system both sides evaluate the same frames (short MD from the reference structure) in one
run. OpenMMEnergy is timed at each of its settings (platform, worker processes) and the best is the
baseline; TorchEnergy eager and compiled, float64 and float32. Accuracy of float32 is reported as the
energy error in kT against float64 (which equals OpenMM's Reference platform to ~1e-13).
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import openmm
import torch

from bg.energy import OpenMMEnergy, TorchEnergy
from bg.systems import MDSettings, aldp, load_md, load_pdb, simulate


def timed(fn, x, repeats: int = 2) -> float:
    fn(x)  # warm-up: contexts, worker pools, compilation
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return best


def frames_for(system, n_frames: int, steps: int, tmp: Path, batch: int) -> np.ndarray:
    out = tmp / system.name
    simulate(system, out, MDSettings(n_frames=n_frames, steps_per_frame=steps, equilibration_steps=steps,
                                     chunk_frames=n_frames), progress=False)
    xyz = load_md(out).xyz.astype(np.float64)
    return np.resize(xyz, (batch, *xyz.shape[1:]))


def bench_system(system, batch: int, frames: np.ndarray, openmm_settings) -> list[str]:
    omm = system.create_openmm_system()
    x = torch.tensor(frames)
    rows = []
    base = None
    for plat, nw in openmm_settings:
        e = OpenMMEnergy(omm, system.temperature, n_workers=nw, platform=plat)
        t = timed(e.energy_and_forces, x, repeats=1)
        e.close()
        rows.append((f"OpenMMEnergy {e.platform_name}, {nw} workers", t))
        base = t if base is None else min(base, t)
    ref64 = None
    for compiled in (False, True):
        for dtype in (torch.float64, torch.float32):
            te = TorchEnergy.from_openmm(omm, system.temperature, compile=compiled)
            xx = x.to(dtype)
            t = timed(te.energy_and_forces, xx)
            u, _ = te.energy_and_forces(xx)
            if dtype == torch.float64 and not compiled:
                ref64 = u
            err = (u.double() - ref64).abs()
            rows.append((f"TorchEnergy {'compiled' if compiled else 'eager'} {str(dtype)[6:]} (chunk {te.chunk_size}); "
                         f"energy error vs f64: mean {err.mean():.1e}, max {err.max():.1e} kT", t))
    out = [f"\n### {system.name} ({system.n_atoms} atoms), batch {batch}, energies + forces\n",
           "| implementation | ms per batch | µs per frame | speed-up vs best OpenMM |", "|---|---|---|---|"]
    for name, t in rows:
        out.append(f"| {name} | {1000 * t:.1f} | {1e6 * t / batch:.0f} | {base / t:.2f}× |")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--villin", default=None)
    p.add_argument("--protein-g", default=None)
    p.add_argument("--out", default="bench/results/torch_energy.md")
    args = p.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    cmd = "`.venv/bin/python bench/torch_energy.py" + (f" --villin {args.villin}" if args.villin else "") + \
          (f" --protein-g {args.protein_g}" if args.protein_g else "") + "`"
    lines = ["# Torch force field vs OpenMM", "",
             f"Machine: {platform.node()}, {platform.machine()}, {__import__('os').cpu_count()} cores, no GPU; "
             f"torch {torch.__version__} ({torch.get_num_threads()} threads), OpenMM {openmm.__version__}. "
             f"Date {time.strftime('%Y-%m-%d')}. Command: {cmd}.",
             "", "Frames: short Langevin MD from each reference structure (tiled to the batch). The baseline is the",
             "fastest OpenMMEnergy setting measured in the same run. Compiled timings exclude the one-off",
             "compilation (~25 s per dtype and chunk shape)."]
    s = aldp()
    lines += bench_system(s, 1024, frames_for(s, 256, 500, tmp, 1024),
                          [("Reference", 0), ("Reference", 2), ("CPU", 0)])
    for path, batch in ((args.villin, 64), (args.protein_g, 32)):
        if path:
            s = load_pdb(path)
            lines += bench_system(s, batch, frames_for(s, 8, 100, tmp, batch), [("CPU", 0), ("CPU", 2)])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines += ["", f"Peak resident memory of the whole run: {peak:.0f} MB."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
