"""Command line: ``bg <command>`` (also ``python -m bg``, and ``lightning`` as an alias).

Commands:
    fit, validate, test, predict   LightningCLI (``bg fit --config configs/aldp_nsf.yaml``; see
                                   ``bg fit --help`` and ``bg.lightning_cli``)
    data   generate (or check) a training dataset: MD of a built-in system, cached, or your
           topology + trajectories; prints where the frames are and how they are split.
    sweep-command FILE [--seed N]   the command a W&B agent would run for one drawn trial of a
           sweep file (a dry run, no W&B server needed); see ``bg.sweeps``.
    analyze SOURCE [--reference ...]   populations, free energies and surfaces with error bars of a
           checkpoint or a samples folder, beside reference MD (``bg.evaluate``); writes a folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
from dataclasses import fields
from pathlib import Path

from bg.cli_errors import UsageError, check_config_files, debug_enabled, explain_exception, nearest

from bg.systems import BUILTIN_SYSTEMS, FORCEFIELDS, MDSettings
from bg.systems.system import resolve_forcefield
from bg.systems.replica_exchange import ReplicaExchangeSettings


def _data(args: argparse.Namespace) -> int:
    if args.peptide_set is not None:
        return _peptide_set(args)
    from datamodules.md import DEFAULT_MD, MDDataModule

    overrides = {f.name: getattr(args, f.name) for f in fields(MDSettings) if getattr(args, f.name, None) is not None}
    settings = MDSettings(**{**DEFAULT_MD.__dict__, **overrides})
    re_overrides = {f.name: getattr(args, "re_" + f.name) for f in fields(ReplicaExchangeSettings)
                    if getattr(args, "re_" + f.name, None) is not None}
    dm = MDDataModule(system=args.system, topology=args.topology, trajectories=args.trajectories,
                      stride=args.stride, cache_dir=args.cache_dir, md=settings, generator=args.generator,
                      replica_exchange=ReplicaExchangeSettings(**re_overrides), forcefield=args.forcefield,
                      temperature=args.temperature, constraints=args.constraints)
    start = time.time()
    if args.system is not None and args.system.lower().endswith((".pdb", ".cif", ".pdbx")):
        print(f"preparing {args.system}: hydrogens, force field, energy minimisation…", flush=True)
    system = dm.system
    print(f"system: {system.name}, {system.n_atoms} atoms, force field {' + '.join(system.forcefield)}, "
          f"{system.temperature} K")
    if not dm.trajectory_patterns and dm.generator == "replica_exchange":
        r = dm.re_settings
        print(f"replica exchange: {r.walkers} walkers × {r.n_replicas} replicas, {r.n_iterations} iterations of "
              f"{r.steps_per_iteration} steps each into {dm.md_dir}")
    elif not dm.trajectory_patterns:
        ns = settings.n_frames * settings.frame_interval_ps / 1000
        print(f"MD: {settings.n_frames} frames every {settings.frame_interval_ps} ps ({ns:g} ns) into {dm.md_dir}")
    dm.prepare_data()
    dm.setup()
    sizes = {k: len(v) for k, v in dm.positions.items()}
    print(f"frames: train {sizes['train']}, val {sizes['val']}, test {sizes['test']} (contiguous blocks, stride "
          f"{dm.stride}, {dm.split_gap} frames left out between blocks)")
    if not args.skip_energy_check:
        from bg.energy.plausibility import thermal_excess

        check = thermal_excess(system, dm.positions["train"].numpy())
        print(check.summary(" + ".join(system.forcefield)), flush=True)
    where = dm.md_dir if not dm.trajectory_patterns else ", ".join(map(str, dm.trajectory_paths()))
    print(f"data ready in {time.time() - start:.0f} s: {where}")
    return 0


def _peptide_set(args: argparse.Namespace) -> int:
    """``bg data --peptide-set SPEC.yaml``: MD of every peptide of a set, split by sequence, with a manifest."""
    from dataclasses import replace

    from bg.systems.peptide_set import format_manifest, make_peptide_set, manifest_path, read_spec

    peptides, spec_md = read_spec(args.peptide_set)
    overrides = {f.name: getattr(args, f.name) for f in fields(MDSettings) if getattr(args, f.name, None) is not None}
    settings = replace(spec_md, **overrides)
    splits = peptides.split()
    ns = settings.n_frames * settings.frame_interval_ps / 1000
    print(f"peptide set {peptides.name}: {sum(map(len, splits.values()))} peptides (train {len(splits['train'])}, "
          f"val {len(splits['val'])}, test {len(splits['test'])}: {' '.join(splits['test'])}), "
          f"{' + '.join(resolve_forcefield(peptides.forcefield))}, {peptides.temperature} K; MD {ns:g} ns each "
          f"({settings.n_frames} frames every {settings.frame_interval_ps} ps)", flush=True)
    start = time.time()
    manifest = make_peptide_set(peptides, args.cache_dir, settings, workers=args.workers)
    print(format_manifest(manifest))
    print(f"data ready in {time.time() - start:.0f} s: {manifest_path(args.cache_dir, peptides.name)}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    if not Path(args.source).exists():  # before importing the models (seconds)
        what = "checkpoint" if Path(args.source).suffix == ".ckpt" else "checkpoint or samples folder"
        raise UsageError(f"{args.source}: {what} not found")
    import bg

    native = None
    if args.native:
        import mdtraj as md

        native = md.load(args.native)
    report = bg.evaluate(args.source, n=args.samples, reference=args.reference, topology=args.topology,
                         native=native, energy=args.energy, bins=args.bins, n_boot=args.bootstrap,
                         min_ess=args.min_ess, seed=args.seed, weights=args.weights)
    stem = Path(args.source).stem if not Path(args.source).is_dir() else Path(args.source).name
    out = Path(args.out or f"analysis/{stem}_{time.strftime('%Y%m%d-%H%M%S')}")
    report.save(out, figures=not args.no_figures)
    print(report.markdown())
    if args.wandb_run:
        import wandb

        run = wandb.init(id=args.wandb_run, resume="allow", project=args.wandb_project)
        run.log({"analysis/" + p.stem: wandb.Image(str(p)) for p in out.glob("*.png")})
        run.finish()
    print(f"report written to {out}/ (report.json, report.md, figures)")
    return 0


LIGHTNING_HELP = {
    "fit": "train a generator: bg fit --config configs/aldp_nsf.yaml (bg fit --help lists every option)",
    "validate": "evaluate a checkpoint on the validation frames (--config ... --ckpt_path ...)",
    "test": "evaluate a checkpoint on the test frames (--config ... --ckpt_path ...)",
    "predict": "draw weighted samples from a checkpoint into a folder of their own (--ckpt_path ...)",
    "sweep-command": "the command a W&B agent would run for one drawn trial of a sweep file (FILE [--seed N])",
}
MD_HELP = {
    "n_frames": "frames to save", "steps_per_frame": "MD steps between saved frames", "timestep_fs": "fs",
    "friction_per_ps": "Langevin friction, 1/ps", "equilibration_steps": "MD steps before the first frame",
    "chunk_frames": "frames per DCD chunk (resume granularity)", "seed": "random seed",
    "platform": "OpenMM platform: auto (Reference below 200 atoms, else CPU), Reference, CPU, CUDA, OpenCL",
    "threads": "CPU platform threads (default: all cores)",
    "hydrogen_mass": "amu: hydrogen mass repartitioning (4 with --constraints hbonds allows --timestep-fs 4)",
}
RE_HELP = {
    "n_iterations": "exchange iterations per walker (= target-temperature frames per walker)",
    "steps_per_iteration": "MD steps between exchanges and saved frames", "n_replicas": "temperatures in the ladder",
    "max_temperature": "K, top of the geometric ladder", "timestep_fs": "fs", "friction_per_ps": "1/ps",
    "equilibration_iterations": "iterations dropped at the start of each walker",
    "walkers": "independent replica-exchange runs, one process each (use the number of cores)",
    "block_iterations": "iterations per block (progress and resume granularity)", "seed": "random seed",
    "platform": "OpenMM platform (auto: Reference, the fastest for small molecules on CPU)",
}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``UsageError`` line (with the nearest valid choice), not usage + exit;
    no abbreviated options (a typo is reported with the nearest name instead of guessed)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        choice = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"'?([\w-]+)'?", choice.group(3))
            message = f"{choice.group(1)}: no such choice '{choice.group(2)}'{nearest(choice.group(2), options)}" \
                      f" (choose from {', '.join(options)})"
        raise UsageError(f"{message} ({self.prog} --help lists the options)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bg", description="Boltzmann generators in PyTorch Lightning",
                                     epilog="BG_DEBUG=1 (or --debug) shows the traceback behind an error message.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in LIGHTNING_HELP.items():  # parsed by LightningCLI (bg <command> --help); listed here
        sub.add_parser(name, help=text, add_help=False)
    data = sub.add_parser("data", help="generate or check a training dataset")
    src = data.add_argument_group("source (a built-in system, or topology + trajectories)")
    src.add_argument("--system", default=None,
                     help=f"built-in system ({', '.join(BUILTIN_SYSTEMS)}), 'peptide:<SEQ>', or a PDB file")
    src.add_argument("--topology", default=None, help="topology (PDB) of --trajectories")
    src.add_argument("--peptide-set", default=None, metavar="SPEC",
                     help="a peptide-set spec (YAML, configs/peptide_sets/*.yaml): MD of many capped peptides, "
                          "split by sequence, for transferable generators")
    src.add_argument("--trajectories", nargs="+", default=None, help="trajectory files or glob patterns")
    data.add_argument("--workers", type=int, default=None,
                      help="processes for --peptide-set (default: one per core)")
    data.add_argument("--stride", type=int, default=1, help="keep every n-th frame (default 1)")
    data.add_argument("--cache-dir", default="data", help="where generated MD goes (default: ./data)")
    data.add_argument("--generator", choices=["md", "replica_exchange"], default="md",
                      help="how data of a built-in system are generated (default: md)")
    data.add_argument("--forcefield", default=None,
                      help=f"force field: a preset ({', '.join(sorted(FORCEFIELDS))}) or OpenMM XML files joined by "
                           "'+'; default: the system's own (aldp: amber99sbildn-obc)")
    data.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    data.add_argument("--constraints", choices=["none", "hbonds"], default="none",
                      help="hbonds: bonds to hydrogen held fixed (with --hydrogen-mass 4 and --timestep-fs 4 the "
                           "fast protein MD); the training config needs data.constraints: hbonds too (default none)")
    data.add_argument("--skip-energy-check", action="store_true",
                      help="do not compare the training frames' energies with equipartition (a minimisation: "
                           "seconds for a protein)")
    md = data.add_argument_group("MD settings for generated data (defaults: 10 ns of alanine dipeptide)")
    for f in fields(MDSettings):
        kind = int if f.type in ("int", "int | None") else (float if f.type in ("float", "float | None") else str)
        md.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                        help=f"{MD_HELP.get(f.name, '')} (default {f.default})".strip())
    rex = data.add_argument_group("replica-exchange settings (--generator replica_exchange)")
    for f in fields(ReplicaExchangeSettings):
        kind = int if f.type == "int" else (float if f.type == "float" else str)
        rex.add_argument(f"--re-{f.name.replace('_', '-')}", dest="re_" + f.name, type=kind, default=None,
                         help=f"{RE_HELP.get(f.name, '')} (default {f.default})".strip())
    data.set_defaults(func=_data)

    an = sub.add_parser("analyze", help="populations, free energies and surfaces with error bars (bg.evaluate)")
    an.add_argument("source", help="a checkpoint (.ckpt) or a `bg predict` samples folder")
    an.add_argument("--samples", type=int, default=20000, help="samples to draw from a checkpoint (default 20000)")
    an.add_argument("--reference", nargs="+", default=None,
                    help="reference MD trajectories, each one independent time-ordered run (needs --topology "
                         "unless the format has one)")
    an.add_argument("--topology", default=None, help="topology (PDB) of --reference")
    an.add_argument("--native", default=None, help="native structure (PDB): adds RMSD, Q and Rg as observables")
    an.add_argument("--energy", choices=["model", "torch", "openmm"], default="model",
                    help="energy that judges the samples (default: the model's own target)")
    an.add_argument("--weights", choices=["averaged", "training"], default="averaged",
                    help="of a checkpoint trained with weight averaging (EMA): the averaged weights (default) or the "
                         "optimizer's own")
    an.add_argument("--bins", type=int, default=36, help="bins per dimension of the free-energy surfaces")
    an.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (weighted samples)")
    an.add_argument("--min-ess", type=float, default=100.0,
                    help="below this many effective samples error bars are flagged unreliable")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--out", default=None, help="output folder (default: analysis/<source>_<time>)")
    an.add_argument("--no-figures", action="store_true")
    an.add_argument("--wandb-run", default=None, help="also log the figures to this W&B run id")
    an.add_argument("--wandb-project", default="bg")
    an.set_defaults(func=_analyze)
    return parser


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
COMMANDS = (*LIGHTNING_COMMANDS, "data", "analyze", "sweep-command")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv else None
    try:
        return _dispatch(argv)
    except _user_errors() as exc:
        if debug:
            raise
        where = f"bg {command}" if command in COMMANDS else "bg"
        print(f"{where}: error: {explain_exception(exc)}", file=sys.stderr)
        _close_wandb_quietly()
        return 2


def _close_wandb_quietly() -> None:
    """End a W&B run the failed command had started without its sync advice (nothing worth syncing)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        os.environ["WANDB_SILENT"] = "true"
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.suppress(Exception):
            wandb.run.finish(exit_code=2)


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input (printed as one line); anything else is a bug and keeps its traceback.
    Evaluated only when an exception is being matched; Lightning's own error type only where Lightning is loaded
    (importing it takes seconds, which `bg data --help` or a typo should not wait for)."""
    exceptions = sys.modules.get("lightning.fabric.utilities.exceptions")
    lightning = (exceptions.MisconfigurationException,) if exceptions is not None else ()
    return UsageError, ValueError, FileNotFoundError, OSError, *lightning


def _dispatch(argv: list[str]) -> int:
    if argv and (argv[0] in LIGHTNING_COMMANDS or argv[0].startswith("--config") or argv[0] == "--print_config"):
        check_config_files(argv)  # before Lightning's import: a misnamed file is reported at once
        from bg.lightning_cli import run

        run(argv)
        return 0
    if argv and argv[0] == "sweep-command":
        from bg.sweeps import main as sweep_main

        sweep_main(argv[1:])
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0 if argv else 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        options = [o for action in sub._actions for o in action.option_strings]
        unknown = next((e.split("=")[0] for e in extra if e.startswith("-")), extra[0])
        raise UsageError(f"unrecognized argument {unknown}{nearest(unknown, options)} (bg {args.command} --help lists "
                         "the options)")
    if args.command == "data" and args.system is None and args.topology is None:
        args.system = "aldp"
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
