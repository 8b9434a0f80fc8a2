"""Equilibrium data by replica exchange (parallel tempering) with openmmtools, one process per walker.

A *walker* is one independent replica-exchange run (openmmtools ``ReplicaExchangeSampler``: ``n_replicas``
Langevin replicas on a geometric temperature ladder from the system's temperature to ``max_temperature``,
all-pairs swaps after every ``steps_per_iteration`` MD steps). Walkers run in parallel processes, one per
core, so a 2-core machine runs two; each writes its own openmmtools storage and resumes from it.

Output directory layout::

    out_dir/
      topology.pdb, positions.npy, system.json   the MolecularSystem (MolecularSystem.save)
      replica_exchange.json                      the settings (a resume must match them)
      walkers/walker_00/storage.nc (+ checkpoint) openmmtools storage (all replicas, all iterations)
      frames/walker_00.dcd ...                   the target-temperature frames of each finished walker
      frames/state_1/walker_00.dcd ...           the same iterations' frames of each hotter state
      report.json                                exchange acceptance, φ > 0 visits per temperature,
                                                 statistical inefficiency of the target frames

The frames are those of the thermodynamic state at the system's temperature (whichever replica held
it), after ``equilibration_iterations``; one frame per iteration. Runs are statistically reproducible,
not bitwise: openmmtools draws the Langevin noise from OpenMM's own seeds.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import mdtraj as md
import numpy as np
from tqdm.auto import tqdm

from bg.estimators import statistical_inefficiency
from bg.quiet import quietly
from bg.systems.simulate import start_run_dir
from bg.systems.system import MolecularSystem


@dataclass(frozen=True)
class ReplicaExchangeSettings:
    """Replica-exchange settings; the defaults generate alanine dipeptide data in ~8 min on 2 cores.

    Attributes:
        n_iterations: exchange iterations per walker after equilibration (= target frames per walker).
        steps_per_iteration: MD steps between exchange attempts (and between saved frames).
        n_replicas: temperatures in the ladder.
        max_temperature: K, top of the geometric ladder that starts at the system's temperature.
        timestep_fs, friction_per_ps: Langevin integrator (openmmtools ``LangevinDynamicsMove``).
        equilibration_iterations: iterations dropped at the start of each walker.
        walkers: independent replica-exchange runs, one process each (use the number of cores).
        block_iterations: iterations per ``run`` call (progress and resume granularity).
        seed: seeds numpy in each walker (swaps, initial velocities) with ``seed + walker``.
        platform: OpenMM platform (``auto``: Reference, the fastest for small molecules on CPU).
    """

    n_iterations: int = 5000
    steps_per_iteration: int = 500
    n_replicas: int = 4
    max_temperature: float = 600.0
    timestep_fs: float = 1.0
    friction_per_ps: float = 1.0
    equilibration_iterations: int = 100
    walkers: int = 2
    block_iterations: int = 250
    seed: int = 1
    platform: str = "auto"

    def __post_init__(self) -> None:
        for name in ("n_iterations", "steps_per_iteration", "n_replicas", "walkers", "block_iterations"):
            if getattr(self, name) <= 0:
                raise ValueError(f"replica exchange setting {name} must be positive, got {getattr(self, name)}")
        if self.equilibration_iterations < 0:
            raise ValueError("replica exchange setting equilibration_iterations must be ≥ 0")

    def temperatures(self, t_min: float) -> np.ndarray:
        """The ladder ``(n_replicas,)`` in K, geometric from ``t_min`` to ``max_temperature``."""
        if self.n_replicas == 1:
            return np.array([t_min])
        if self.max_temperature <= t_min:
            raise ValueError(f"max_temperature {self.max_temperature} K must exceed the system's {t_min} K")
        return np.geomspace(t_min, self.max_temperature, self.n_replicas)

    @property
    def total_iterations(self) -> int:
        return self.equilibration_iterations + self.n_iterations


def walker_dir(out_dir: Path, walker: int) -> Path:
    return Path(out_dir) / "walkers" / f"walker_{walker:02d}"


def frame_files(out_dir: str | Path) -> list[Path]:
    """The target-temperature frame files of the finished walkers, in walker order."""
    return sorted((Path(out_dir) / "frames").glob("walker_*.dcd"))


def state_frame_files(out_dir: str | Path, state: int) -> list[Path]:
    """The frame files of thermodynamic state ``state`` (ladder index; 0 = the target temperature) of the
    finished walkers, in walker order, aligned frame by frame with :func:`frame_files`. Hotter states are
    exported from each walker's storage on first request (runs made before they were exported too)."""
    out_dir = Path(out_dir)
    if state == 0:
        return frame_files(out_dir)
    settings = json.loads((out_dir / "replica_exchange.json").read_text())["settings"]
    s = ReplicaExchangeSettings(**settings)
    if not 0 <= state < s.n_replicas:
        raise ValueError(f"replica exchange: state {state} is not on the ladder of {s.n_replicas} temperatures "
                         f"(0 = the target temperature … {s.n_replicas - 1})")
    files = []
    for target in frame_files(out_dir):
        path = _state_path(target, state)
        if not path.exists():
            _, _, multistate, _ = _quiet_import()
            walker = int(target.stem.split("_")[1])
            system = MolecularSystem.load(out_dir)
            with quietly():
                reporter = multistate.MultiStateReporter(str(walker_dir(out_dir, walker) / "storage.nc"), open_mode="r")
                try:
                    _write_states(_by_state(reporter, system, s)[0], system, target, range(1, s.n_replicas))
                finally:
                    reporter.close()
        files.append(path)
    return files


def _state_path(target: Path, state: int) -> Path:
    return target.parent / f"state_{state}" / target.name


def _write_states(by_state: np.ndarray, system: MolecularSystem, target: Path, states) -> None:
    for k in states:
        path = _state_path(target, k)
        path.parent.mkdir(parents=True, exist_ok=True)
        md.Trajectory(by_state[:, k], system.topology).save_dcd(str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)


def _quiet_import():
    with quietly():
        import openmmtools  # noqa: F401
        from openmmtools import cache, mcmc, multistate, states  # noqa: F401
    return cache, mcmc, multistate, states


def _run_walker(system_dir: str, out_dir: str, settings: dict, walker: int, queue) -> None:
    """One replica-exchange run (in its own process): create or resume, run, export the target frames."""
    import openmm
    from openmm import unit

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    wdir = walker_dir(Path(out_dir), walker)
    wdir.mkdir(parents=True, exist_ok=True)
    # openmmtools' banners, citations and warnings go to the walker's log, not the user's terminal.
    log = open(wdir / "log.txt", "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log  # also when the parent had replaced them (pytest, notebooks)
    cache, mcmc, multistate, states = _quiet_import()
    s = ReplicaExchangeSettings(**settings)
    system = MolecularSystem.load(system_dir)
    storage = wdir / "storage.nc"
    platform = "Reference" if s.platform == "auto" else s.platform
    cache.global_context_cache.platform = openmm.Platform.getPlatformByName(platform)
    np.random.seed(s.seed + walker)
    if storage.exists():
        reporter = multistate.MultiStateReporter(str(storage), open_mode="a")
        sampler = multistate.ReplicaExchangeSampler.from_storage(reporter)
        print(f"bg: walker {walker} resumed at iteration {sampler.iteration}", flush=True)
    else:
        omm = system.create_openmm_system()
        ladder = s.temperatures(system.temperature)
        thermo = [states.ThermodynamicState(omm, temperature=t * unit.kelvin) for t in ladder]
        move = mcmc.LangevinDynamicsMove(timestep=s.timestep_fs * unit.femtosecond,
                                         collision_rate=s.friction_per_ps / unit.picosecond,
                                         n_steps=s.steps_per_iteration, reassign_velocities=False)
        sampler = multistate.ReplicaExchangeSampler(mcmc_moves=move, number_of_iterations=s.total_iterations,
                                                    online_analysis_interval=None)
        reporter = multistate.MultiStateReporter(str(storage), checkpoint_interval=1)
        start = states.SamplerState(positions=system.positions * unit.nanometer)
        sampler.create(thermo, start, reporter)
        sampler.minimize()
    queue.put((walker, sampler.iteration))
    while sampler.iteration < s.total_iterations:
        n = min(s.block_iterations, s.total_iterations - sampler.iteration)
        sampler.run(n)
        print(f"bg: walker {walker} at iteration {sampler.iteration}", flush=True)
        queue.put((walker, n))
    frames = wdir / "frames.dcd"
    final = Path(out_dir) / "frames" / f"walker_{walker:02d}.dcd"
    _export(reporter, system, s, frames, final)
    reporter.close()
    final.parent.mkdir(exist_ok=True)
    os.replace(frames, final)  # last: the target file marks the walker finished


def _export(reporter, system: MolecularSystem, s: ReplicaExchangeSettings, path: Path, final: Path) -> None:
    """Write the frames of every state (the target's to ``path``, to be moved to ``final``; hotter ones
    beside ``final``, see :func:`state_frame_files`) and this walker's statistics (``<walker>/stats.json``)."""
    by_state, state_of, its = _by_state(reporter, system, s)
    _write_states(by_state, system, final, range(1, s.n_replicas))
    md.Trajectory(by_state[:, 0], system.topology).save_dcd(str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    accepted, proposed = reporter.read_mixing_statistics()  # (iterations, states, states) each
    positive = [float(phi_positive(by_state[:, k], system.topology).mean()) for k in range(s.n_replicas)]
    target_phi = phi_positive(by_state[:, 0], system.topology).astype(float)
    energies = reporter.read_energies()[0]  # (iterations + 1, replicas, states) reduced
    u_target = np.array([energies[it][np.nonzero(state_of[it] == 0)[0][0], 0] for it in its])
    out = {
        "frames": len(its),
        "phi_positive_by_temperature": positive,
        "phi_positive_transitions_target": int(np.abs(np.diff(target_phi)).sum()),
        "statistical_inefficiency": {"reduced_energy": statistical_inefficiency(u_target),
                                     "phi_positive": statistical_inefficiency(target_phi)},
    }
    out["neighbour_acceptance"] = neighbour_acceptance(np.asarray(accepted).sum(0), np.asarray(proposed).sum(0))
    (path.parent / "stats.json").write_text(json.dumps(out, indent=2))


def _by_state(reporter, system: MolecularSystem, s: ReplicaExchangeSettings) -> tuple[np.ndarray, np.ndarray, range]:
    """``(iterations, n_replicas, N, 3)`` float32 nm: each saved iteration's positions by thermodynamic state
    (whichever replica held it), after equilibration; with the state of each replica per stored iteration
    ``(iterations + 1, n_replicas)`` and the iterations exported."""
    from openmm import unit

    state_of = np.asarray(reporter.read_replica_thermodynamic_states())  # (iterations + 1, replicas)
    n_it = min(len(state_of) - 1, s.total_iterations)
    its = range(s.equilibration_iterations + 1, n_it + 1)
    by_state = np.empty((len(its), s.n_replicas, system.n_atoms, 3), dtype=np.float32)
    for i, it in enumerate(its):
        sampler_states = reporter.read_sampler_states(it)
        for replica, state in enumerate(state_of[it]):
            by_state[i, state] = sampler_states[replica].positions.value_in_unit(unit.nanometer)
    return by_state, state_of, its


def phi_positive(xyz: np.ndarray, topology: md.Topology) -> np.ndarray:
    """``(F,)`` bool: some backbone φ of the frame ``(F, N, 3)`` nm is positive (the rare basins of peptides)."""
    _, phi = md.compute_phi(md.Trajectory(xyz, topology))
    return (phi > 0).any(axis=1) if phi.shape[1] else np.zeros(len(xyz), dtype=bool)


def neighbour_acceptance(n_accepted: np.ndarray, n_proposed: np.ndarray) -> list[float]:
    """Swap acceptance between neighbouring temperatures ``(n_replicas − 1,)`` from the swap matrices."""
    out = []
    for k in range(len(n_accepted) - 1):
        proposed = n_proposed[k, k + 1] + n_proposed[k + 1, k]
        out.append(float((n_accepted[k, k + 1] + n_accepted[k + 1, k]) / proposed) if proposed else float("nan"))
    return out


def replica_exchange(
    system: MolecularSystem,
    out_dir: str | Path,
    settings: ReplicaExchangeSettings | None = None,
    progress: bool = True,
) -> list[Path]:
    """Run (or resume) ``settings.walkers`` replica-exchange walkers of ``system`` in parallel processes;
    returns the target-temperature frame files (one DCD per walker) and writes ``report.json``."""
    settings = settings or ReplicaExchangeSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings.temperatures(system.temperature)  # a bad ladder fails here, not in the workers
    # more walkers later add independent runs beside the finished ones (a longer reference, say)
    start_run_dir(out_dir, "replica_exchange.json", system, settings, "a replica-exchange run", may_grow=("walkers",))
    todo = [w for w in range(settings.walkers) if not (out_dir / "frames" / f"walker_{w:02d}.dcd").exists()]
    if todo:
        _run_walkers(out_dir, settings, todo, progress, system.name)
    report = write_report(out_dir, settings)
    if progress:
        print(format_report(report))
    return frame_files(out_dir)


def _run_walkers(out_dir: Path, settings: ReplicaExchangeSettings, todo: list[int], progress: bool, name: str) -> None:
    # fork: works from any script (spawn needs a __main__ guard); the walkers use no torch and make
    # their own OpenMM contexts.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run_walker, args=(str(out_dir), str(out_dir), asdict(settings), w, queue))
             for w in todo]
    for p in procs:
        p.start()
    total = settings.total_iterations * len(todo)
    bar = tqdm(total=total, desc=f"replica exchange {name} ({len(todo)} walkers × {settings.n_replicas} replicas)",
               unit="it", disable=not progress)
    try:
        while any(p.is_alive() for p in procs) or not queue.empty():
            try:
                _, n = queue.get(timeout=1.0)
                bar.update(n)
            except queue_module.Empty:
                pass
    finally:
        bar.close()
        for p in procs:
            p.join()
    failed = [w for w, p in zip(todo, procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"replica-exchange walker(s) {failed} failed (exit codes "
                           f"{[p.exitcode for p in procs]}); rerun to resume from {out_dir}/walkers")


def write_report(out_dir: str | Path, settings: ReplicaExchangeSettings) -> dict:
    """Combine the walkers' statistics into ``report.json`` (and return it)."""
    out_dir = Path(out_dir)
    walkers = [json.loads((walker_dir(out_dir, w) / "stats.json").read_text()) for w in range(settings.walkers)
               if (walker_dir(out_dir, w) / "stats.json").exists()]
    system = MolecularSystem.load(out_dir)
    frames = sum(w["frames"] for w in walkers)
    g = max(max(w["statistical_inefficiency"].values()) for w in walkers)
    report = {
        "temperatures_K": [float(t) for t in settings.temperatures(system.temperature)],
        "walkers": walkers,
        "target_frames": frames,
        "frame_interval_ps": settings.steps_per_iteration * settings.timestep_fs / 1000.0,
        "phi_positive_target": float(np.average([w["phi_positive_by_temperature"][0] for w in walkers],
                                                weights=[w["frames"] for w in walkers])),
        "statistical_inefficiency": g,
        "effective_frames": frames / g,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    lines = [f"replica exchange: {report['target_frames']} target frames, every {report['frame_interval_ps']:g} ps; "
             f"ladder {', '.join(f'{t:.0f}' for t in report['temperatures_K'])} K"]
    for i, w in enumerate(report["walkers"]):
        acc = ", ".join(f"{a:.2f}" for a in w.get("neighbour_acceptance", []))
        pos = ", ".join(f"{p:.3f}" for p in w["phi_positive_by_temperature"])
        lines.append(f"  walker {i}: neighbour swap acceptance [{acc}]; φ>0 fraction by temperature [{pos}]; "
                     f"{w['phi_positive_transitions_target']} φ>0 entries/exits at the target temperature")
    lines.append(f"  target φ>0 population {report['phi_positive_target']:.4f}; statistical inefficiency "
                 f"g = {report['statistical_inefficiency']:.1f} frames → {report['effective_frames']:.0f} effective frames")
    return "\n".join(lines)


def split_gap(out_dir: str | Path) -> int:
    """Frames to leave out between the train/val/test blocks (the statistical inefficiency, rounded up),
    so that neighbouring blocks are not correlated; 0 without a report."""
    path = Path(out_dir) / "report.json"
    if not path.exists():
        return 0
    return int(math.ceil(json.loads(path.read_text())["statistical_inefficiency"]))
