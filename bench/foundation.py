"""Foundation figures: representation accuracy, energy agreement and throughput, MD speed.

    .venv/bin/python bench/foundation.py [--villin ../shared/data/villin_1vii.pdb] [--out bench/results/foundation.md]

Runs a short aldp MD (and villin local MD if the PDB is given), then measures against the
independent references (mdtraj, OpenMM, autograd) and writes a Markdown table naming the machine.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import mdtraj as md
import numpy as np
import openmm
import torch
from openmm import unit

import bg
from bg.coordinates import InternalCoordinates
from bg.energy import OpenMMEnergy
from bg.systems import MDSettings, aldp, load_md, load_pdb, simulate


def pairwise(x):
    return torch.linalg.vector_norm(x[:, :, None] - x[:, None], dim=-1)


def roundtrip(ic, frames):
    out = {}
    for dtype in (torch.float64, torch.float32):
        x = torch.tensor(frames, dtype=dtype)
        xr, _ = ic.inverse(ic(x)[0])
        out[str(dtype).split(".")[1]] = (pairwise(xr) - pairwise(x)).abs().max().item()
    return out


def logdet_vs_autograd(ic, frames, n=2):
    worst = 0.0
    for f in torch.tensor(frames[:n], dtype=torch.float64):
        jac = torch.func.jacrev(lambda v: ic.forward_full(v.reshape(1, -1, 3))[0].reshape(-1))(f.reshape(-1))
        _, logabs = torch.linalg.slogdet(jac)
        worst = max(worst, abs(logabs.item() - ic.forward_full(f[None])[1].item()))
    return worst


def phi_psi_error(ic, top, frames):
    traj = md.Trajectory(frames.astype(np.float32), top)
    z, _ = ic(torch.tensor(traj.xyz, dtype=torch.float64))
    phi_i, psi_i = ic.phi_psi_indices()
    err = 0.0
    for idx, (_, ref) in [(phi_i, md.compute_phi(traj, opt=False)), (psi_i, md.compute_psi(traj, opt=False))]:
        err = max(err, np.abs(np.angle(np.exp(1j * (z[:, idx].numpy() - ref)))).max())
    return err


def energy_rows(system, frames, batch, worker_counts):
    omm = system.create_openmm_system()
    ctx = openmm.Context(omm, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    e_ref = []
    for x in frames[:5]:
        ctx.setPositions(x)
        e_ref.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    rows = []
    x = torch.tensor(np.resize(frames, (batch, *frames.shape[1:])), dtype=torch.float64)
    for nw in worker_counts:
        energy = OpenMMEnergy(omm, system.temperature, n_workers=nw)
        u, _ = energy.energy_and_forces(torch.tensor(frames[:5]))
        rel = np.max(np.abs(u.numpy() * system.kT - np.array(e_ref)) / np.abs(e_ref))
        energy.energy_and_forces(x[: max(nw, 1) * 2])  # warm up contexts / workers
        t = time.perf_counter()
        energy.energy_and_forces(x)
        dt = time.perf_counter() - t
        rows.append((system.name, energy.platform_name, nw, batch, rel, batch / dt, dt / batch * 1e6))
        energy.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--villin", default=None, help="path of villin_1vii.pdb (optional)")
    p.add_argument("--out", default="bench/results/foundation.md")
    args = p.parse_args()
    torch.set_num_threads(2)
    lines = [
        "# Foundation benchmark",
        "",
        f"Machine: {platform.node()} — {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{__import__('os').cpu_count()} cores; torch {torch.__version__}, OpenMM {openmm.__version__}, mdtraj {md.__version__}, bg {bg.__version__}.",
        f"Date: {time.strftime('%Y-%m-%d')}. Command: `.venv/bin/python bench/foundation.py"
        + (f" --villin {args.villin}`" if args.villin else "`"),
        "",
    ]
    tmp = Path(tempfile.mkdtemp())
    systems = []
    s = aldp()
    settings = MDSettings(n_frames=1000, steps_per_frame=500, equilibration_steps=10_000, chunk_frames=500)
    t = time.perf_counter()
    simulate(s, tmp / "aldp", settings, progress=False)
    md_rows = [(s.name, "Reference", s.n_atoms, settings.n_frames * settings.steps_per_frame, time.perf_counter() - t, 1.0)]
    systems.append((s, load_md(tmp / "aldp").xyz.astype(np.float64)))
    if args.villin:
        v = load_pdb(args.villin)
        vs = MDSettings(n_frames=20, steps_per_frame=100, equilibration_steps=500, chunk_frames=20)
        t = time.perf_counter()
        simulate(v, tmp / "villin", vs, progress=False)
        md_rows.append((v.name, "CPU", v.n_atoms, vs.n_frames * vs.steps_per_frame + vs.equilibration_steps,
                        time.perf_counter() - t, 1.0))
        systems.append((v, load_md(tmp / "villin").xyz.astype(np.float64)))

    lines += ["## Internal coordinates (real MD frames)", "",
              "| system | atoms | frames | dim | max Δ distance f64 (nm) | max Δ distance f32 (nm) | log-det vs autograd | φ/ψ vs mdtraj (rad) | fwd+inv per frame (µs) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for system, frames in systems:
        ic = InternalCoordinates(system.topology)
        rt = roundtrip(ic, frames)
        ld = logdet_vs_autograd(ic, frames)
        pe = phi_psi_error(ic, system.topology, frames)
        x = torch.tensor(np.resize(frames, (256, *frames.shape[1:])), dtype=torch.float32)
        t = time.perf_counter()
        for _ in range(3):
            ic.inverse(ic(x)[0])
        us = (time.perf_counter() - t) / 3 / 256 * 1e6
        lines.append(f"| {system.name} | {system.n_atoms} | {len(frames)} | {ic.dim} | {rt['float64']:.1e} | {rt['float32']:.1e} | "
                     f"{ld:.1e} | {pe:.1e} | {us:.0f} |")
    red = [(s_, f) for s_, f in systems if s_.n_atoms > 100]
    for system, frames in red:
        icr = InternalCoordinates(system.topology, reduced=True, reference=frames)
        lines.append(f"\nReduced representation of {system.name}: {icr.dim} free coordinates of {3 * system.n_atoms - 6}.")

    lines += ["", "## OpenMMEnergy (energies + forces)", "",
              "| system | platform | workers | batch | max rel. error vs direct OpenMM | frames/s | µs/frame |",
              "|---|---|---|---|---|---|---|"]
    for system, frames in systems:
        batch = 1024 if system.n_atoms < 100 else 32
        for row in energy_rows(system, frames, batch, (0, 2)):
            lines.append("| {} | {} | {} | {} | {:.1e} | {:.0f} | {:.0f} |".format(*row))

    lines += ["", "## MD (LangevinMiddleIntegrator, 1 fs, no constraints)", "",
              "| system | platform | atoms | steps | wall (s) | ns/day |", "|---|---|---|---|---|---|"]
    for name, plat, n, steps, wall, dt_fs in md_rows:
        lines.append(f"| {name} | {plat} | {n} | {steps} | {wall:.1f} | {steps * dt_fs * 1e-6 / wall * 86400:.0f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
