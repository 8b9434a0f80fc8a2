"""MD throughput of the proteins under the integration options issue 20 asks about (villin 1VII, protein G 1PGA).

For each protein (amber14-all + OBC2, 300 K, Langevin middle integrator, 1/ps, no cutoff, OpenMM's CPU
platform on every core): ns/day and whether the run stays finite for

- 1 fs, no constraints (what bg's MD and the torch force field use today),
- 2 fs, bonds to hydrogen constrained,
- 4 fs, bonds to hydrogen constrained and hydrogen mass repartitioning (hydrogens at ``--hydrogen-mass``
  amu, the mass taken from their bonded heavy atoms: same total mass, same equilibrium distribution of
  positions — only the dynamics change).

Constraints do change the sampled distribution (bond lengths to hydrogen become fixed), so data made
with them are the equilibrium of the constrained model; a flow over internal coordinates that models
those bonds would have to hold them fixed as well.

    python bench/protein_md_speed.py --out bench/results/protein_md_speed.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bg.systems import load_pdb  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
PROTEINS = {"villin 1VII": "villin_1vii.pdb", "protein G 1PGA": "protein_g_1pga.pdb"}
VARIANTS = [("1 fs, no constraints", 1.0, None, None), ("2 fs, H-bond constraints", 2.0, app.HBonds, None),
            ("4 fs, H-bond constraints + HMR", 4.0, app.HBonds, "hmr")]


def measure(system, timestep_fs: float, constraints, hmr_mass: float | None, steps: int, threads: int) -> dict:
    """ns/day over ``steps`` steps after a short warm-up, from the system's minimised positions."""
    ff = app.ForceField(*system.forcefield)
    kwargs = dict(constraints=constraints, removeCMMotion=False, nonbondedMethod=app.NoCutoff)
    if hmr_mass is not None:
        kwargs["hydrogenMass"] = hmr_mass * unit.amu
    omm = ff.createSystem(system.omm_topology, **kwargs)
    integrator = openmm.LangevinMiddleIntegrator(system.temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(1)
    ctx = openmm.Context(omm, integrator, openmm.Platform.getPlatformByName("CPU"), {"Threads": str(threads)})
    ctx.setPositions(system.positions * unit.nanometer)
    ctx.applyConstraints(1e-6)
    ctx.setVelocitiesToTemperature(system.temperature * unit.kelvin, 1)
    integrator.step(100)
    t0 = time.perf_counter()
    integrator.step(steps)
    seconds = time.perf_counter() - t0
    state = ctx.getState(getPositions=True, getEnergy=True)
    pos = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    kt = unit.MOLAR_GAS_CONSTANT_R * system.temperature * unit.kelvin
    return dict(ns_per_day=steps * timestep_fs * 1e-6 / seconds * 86400, finite=bool(np.all(np.isfinite(pos))),
                u_kT=state.getPotentialEnergy() / kt, ms_per_step=1000 * seconds / steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hydrogen-mass", type=float, default=4.0, help="amu, for the HMR variant")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lines = [f"Machine: {platform.node()} ({args.threads} OpenMM CPU threads), OpenMM {openmm.__version__}; "
             f"{args.steps} steps per row after 100 of warm-up, from the minimised structure; amber14-all + OBC2, "
             "300 K, Langevin middle, 1/ps, no cutoff.", "",
             "| protein | atoms | integration | ms per step | ns/day | finite | u at the end (kT) |",
             "|---|---|---|---|---|---|---|"]
    for name, file in PROTEINS.items():
        path = SHARED / file
        if not path.exists():
            print(f"{path} not present; skipped", file=sys.stderr)
            continue
        system = load_pdb(path)
        for label, dt, cons, hmr in VARIANTS:
            r = measure(system, dt, cons, args.hydrogen_mass if hmr else None, args.steps, args.threads)
            lines.append(f"| {name} | {system.n_atoms} | {label}{f' ({args.hydrogen_mass:g} amu)' if hmr else ''} | "
                         f"{r['ms_per_step']:.1f} | {r['ns_per_day']:.1f} | {r['finite']} | {r['u_kT']:.0f} |")
            print(lines[-1], flush=True)
    lines += ["", "Command: `python bench/protein_md_speed.py" + (f" --out {args.out}" if args.out else "") + "`"]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
