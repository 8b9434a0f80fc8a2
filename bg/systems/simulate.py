"""Langevin MD with OpenMM into a resumable, mdtraj-readable trajectory.

Output directory layout::

    out_dir/
      topology.pdb, positions.npy, system.json   the MolecularSystem (MolecularSystem.save)
      md.json                                    the MD settings (a resume must match them)
      chunks/chunk_00000.dcd ...                 frames, one DCD file per chunk
      chunks/state_00000.xml                     OpenMM state after each chunk (for resuming)

Every chunk is written to a temporary name and renamed when complete, then its state; a killed
run resumes from the last chunk that has both and loses no finished frame. Each chunk reseeds
the integrator from (seed, chunk index), so a resumed run produces the same frames as an
uninterrupted one on a deterministic platform (Reference).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mdtraj as md
import numpy as np
import openmm
from openmm import unit
from tqdm.auto import tqdm

from bg.systems.system import MolecularSystem

#: Below this many atoms the Reference platform is faster than CPU (measured here: alanine
#: dipeptide with OBC, 3,500 vs 770 ns/day); above it the CPU platform wins.
REFERENCE_PLATFORM_MAX_ATOMS = 200


@dataclass(frozen=True)
class MDSettings:
    """Langevin MD settings (LangevinMiddleIntegrator).

    ``hydrogen_mass`` (amu): hydrogen mass repartitioning, each hydrogen made this heavy with the difference
    taken from the atom it is bonded to (total mass kept). It changes the dynamics only, not the equilibrium
    distribution, and with ``constraints: hbonds`` on the system allows 4 fs steps (proteins here: ~4.6× the
    ns/day of 1 fs unconstrained, bench/results/protein_md_speed.md)."""

    n_frames: int = 1000
    steps_per_frame: int = 500
    timestep_fs: float = 1.0
    friction_per_ps: float = 1.0
    equilibration_steps: int = 10_000
    chunk_frames: int = 500
    seed: int = 1
    platform: str = "auto"
    threads: int | None = None
    hydrogen_mass: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_frames", "steps_per_frame", "chunk_frames"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MD setting {name} must be positive, got {getattr(self, name)}")
        if self.hydrogen_mass is not None and not 1.0 <= self.hydrogen_mass <= 5.0:
            raise ValueError(f"MD setting hydrogen_mass must be in [1, 5] amu (4 is the usual repartitioning), got "
                             f"{self.hydrogen_mass}")

    @property
    def frame_interval_ps(self) -> float:
        return self.steps_per_frame * self.timestep_fs / 1000.0


def choose_platform(n_atoms: int, name: str = "auto", threads: int | None = None,
                    system: openmm.System | None = None) -> tuple[openmm.Platform, dict]:
    """The OpenMM platform for ``n_atoms`` ('auto': Reference below 200 atoms, else CPU — and CPU whenever
    ``system`` has a ``CustomGBForce``, e.g. amber14's implicit/obc2.xml, which the Reference platform
    evaluates 4–5× slower than CPU on one thread: 575 against 2,738 steps/s for Ace-Ala-Nme here, where
    amber99_obc.xml's GBSAOBCForce runs 22,908 steps/s on Reference)."""
    if name == "auto":
        custom_gb = system is not None and any(isinstance(f, openmm.CustomGBForce) for f in system.getForces())
        name = "Reference" if n_atoms < REFERENCE_PLATFORM_MAX_ATOMS and not custom_gb else "CPU"
    try:
        platform = openmm.Platform.getPlatformByName(name)
    except Exception as exc:
        names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        raise ValueError(f"OpenMM platform {name!r} is not available; choose one of {names} or 'auto'") from exc
    props = {"Threads": str(threads)} if (threads and name == "CPU") else {}
    return platform, props


def _equilibrate(context: openmm.Context, steps: int, desc: str, progress: bool, blocks: int = 100) -> None:
    """``steps`` MD steps in ``blocks`` pieces under a progress bar (a protein's equilibration takes minutes)."""
    if steps <= 0:
        return
    block = max(1, steps // blocks)
    with tqdm(total=steps, desc=desc, unit="step", unit_scale=True, disable=not progress) as bar:
        done = 0
        while done < steps:
            n = min(block, steps - done)
            context.getIntegrator().step(n)
            done += n
            bar.update(n)


def _chunk_seed(seed: int, chunk: int) -> int:
    # OpenMM treats seed 0 as "pick one at random": keep seeds positive and reproducible.
    return (seed * 1_000_003 + chunk * 7919) % (2**31 - 1) + 1


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def start_run_dir(out_dir: Path, meta_name: str, system: MolecularSystem, settings: Any, kind: str,
                  may_grow: tuple[str, ...] = (), free: tuple[str, ...] = ("platform", "threads")) -> None:
    """Claim ``out_dir`` for a resumable run of ``system`` with ``settings`` (a dataclass): a new directory gets
    the system (``MolecularSystem.save``) and ``meta_name``; an existing one must hold the same run, else a
    ``ValueError`` names each setting that differs (``kind`` says what the run is, e.g. "an MD run").
    Settings named in ``may_grow`` may increase (e.g. more independent walkers beside the finished ones); those in
    ``free`` change no physics (where and on how many threads it runs) and may differ."""
    meta_path = out_dir / meta_name
    meta = {"settings": asdict(settings), "n_atoms": system.n_atoms, "temperature": system.temperature,
            "forcefield": list(system.forcefield), "constraints": system.constraints}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        old_settings = old.get("settings") or {}
        mismatch = [f"{k}: {old.get(k)} here, {meta[k]} asked" for k in meta if k != "settings" and old.get(k) != meta[k]]
        for k, v in meta["settings"].items():
            before = old_settings.get(k)
            if before != v and k not in free and not (k in may_grow and before is not None and v > before):
                mismatch.append(f"{k}: {before} here, {v} asked")
        if mismatch:
            raise ValueError(
                f"{out_dir} holds {kind} with other settings ({'; '.join(mismatch)}); "
                "use a new directory or delete it to start over"
            )
        if meta["settings"] != old_settings:
            _atomic_write_text(meta_path, json.dumps(meta, indent=2))
    else:
        system.save(out_dir)
        _atomic_write_text(meta_path, json.dumps(meta, indent=2))


def completed_chunks(out_dir: str | Path) -> list[int]:
    """Chunk indices whose frames and state are both on disk."""
    chunks = Path(out_dir) / "chunks"
    done = []
    for f in sorted(chunks.glob("chunk_*.dcd")):
        index = f.stem.split("_")[1]
        if not index.isdigit():  # a chunk being written (chunk_00001.tmp.dcd), not finished
            continue
        k = int(index)
        if (chunks / f"state_{k:05d}.xml").exists():
            done.append(k)
    # Only a contiguous prefix counts.
    return [k for i, k in enumerate(done) if k == i]


def trajectory_files(out_dir: str | Path) -> list[Path]:
    """The finished chunk files of an MD directory, in order."""
    return [Path(out_dir) / "chunks" / f"chunk_{k:05d}.dcd" for k in completed_chunks(out_dir)]


def load_md(out_dir: str | Path, stride: int = 1) -> md.Trajectory:
    """All finished frames of an MD directory as one mdtraj trajectory."""
    files = trajectory_files(out_dir)
    if not files:
        raise FileNotFoundError(f"{out_dir}: no finished MD chunks; run bg.systems.simulate first")
    return md.load([str(f) for f in files], top=str(Path(out_dir) / "topology.pdb"), stride=stride)


def simulate(
    system: MolecularSystem,
    out_dir: str | Path,
    settings: MDSettings | None = None,
    progress: bool = True,
) -> list[Path]:
    """Run (or resume) Langevin MD of ``system`` into ``out_dir``; returns the chunk files.

    The run has ``settings.n_frames`` frames, one every ``steps_per_frame`` steps, after
    ``equilibration_steps`` steps from the system's reference positions.
    """
    settings = settings or MDSettings()
    out_dir = Path(out_dir)
    chunks_dir = out_dir / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    start_run_dir(out_dir, "md.json", system, settings, "an MD run")

    n_chunks = -(-settings.n_frames // settings.chunk_frames)
    done = completed_chunks(out_dir)
    if len(done) >= n_chunks:
        return trajectory_files(out_dir)

    omm_system = system.create_openmm_system(hydrogen_mass=settings.hydrogen_mass)
    platform, props = choose_platform(system.n_atoms, settings.platform, settings.threads, omm_system)

    def new_context(chunk: int) -> openmm.Context:
        # The integrator's seed is read when a Context is created, so each chunk gets a new one.
        integrator = openmm.LangevinMiddleIntegrator(
            system.temperature * unit.kelvin, settings.friction_per_ps / unit.picosecond,
            settings.timestep_fs * unit.femtosecond)
        integrator.setRandomNumberSeed(_chunk_seed(settings.seed, chunk))
        return openmm.Context(omm_system, integrator, platform, props)

    start = len(done)
    if start == 0:
        context = new_context(-1)
        context.setPositions(system.positions * unit.nanometer)
        context.setVelocitiesToTemperature(system.temperature * unit.kelvin, _chunk_seed(settings.seed, -1))
        _equilibrate(context, settings.equilibration_steps, f"equilibration {system.name}", progress)
        state = context.getState(getPositions=True, getVelocities=True, getParameters=True)
        del context
    else:
        state = openmm.XmlSerializer.deserialize((chunks_dir / f"state_{start - 1:05d}.xml").read_text())

    bar = tqdm(total=settings.n_frames, initial=min(start * settings.chunk_frames, settings.n_frames),
               desc=f"MD {system.name}", unit="frame", disable=not progress)
    md_top = system.topology
    for k in range(start, n_chunks):
        context = new_context(k)
        context.setState(state)
        integrator = context.getIntegrator()
        n = min(settings.chunk_frames, settings.n_frames - k * settings.chunk_frames)
        xyz = np.empty((n, system.n_atoms, 3), dtype=np.float32)
        for i in range(n):
            integrator.step(settings.steps_per_frame)
            pos = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            if not np.all(np.isfinite(pos)):
                raise RuntimeError(f"MD of {system.name} blew up in chunk {k} (non-finite positions); lower the timestep")
            xyz[i] = pos
            bar.update(1)
        tmp = chunks_dir / f"chunk_{k:05d}.tmp.dcd"
        md.Trajectory(xyz, md_top).save_dcd(str(tmp))
        os.replace(tmp, chunks_dir / f"chunk_{k:05d}.dcd")
        xml = openmm.XmlSerializer.serialize(context.getState(getPositions=True, getVelocities=True, getParameters=True))
        del context
        _atomic_write_text(chunks_dir / f"state_{k:05d}.xml", xml)
        # Continue from what a resume would read, so resumed and uninterrupted runs are identical.
        state = openmm.XmlSerializer.deserialize(xml)
    bar.close()
    return trajectory_files(out_dir)
