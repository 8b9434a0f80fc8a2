"""W&B sweep files, offline: draw a trial's values and build the command a ``wandb agent`` would run.

``wandb sweep configs/sweeps/<x>.yaml`` registers a sweep; ``wandb agent <id>`` then runs, per trial,
the file's ``command`` with its macros expanded. ``agent_command`` performs that expansion as wandb
0.31's agent does (``wandb_agent.Agent``: ``${env}`` → ``/usr/bin/env``, ``${interpreter}`` → the word
``python``, ``${program}``, ``${args}`` → ``--key=value`` per parameter through wandb's own
``create_sweep_command_args``, ``${args_json_file}``), so that sweep files can be checked, and a trial
reproduced, without a W&B server: ``bg sweep-command configs/sweeps/aldp_nsf.yaml --seed 3``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import yaml

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


def load_sweep(path: str | Path) -> dict[str, Any]:
    """A sweep file, with the checks W&B would only make after ``wandb sweep`` has run."""
    try:
        sweep = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc}); write the command as a block list (- item per line), "
                         "since ${{...}} inside [...] is not YAML") from exc
    for key in ("method", "metric", "parameters"):
        if key not in sweep:
            raise ValueError(f"{path}: a sweep file needs '{key}'")
    command = sweep.get("command", DEFAULT_COMMAND)
    if "${program}" in command and "program" not in sweep:
        raise ValueError(f"{path}: the command uses ${{program}} but the file has no 'program'")
    if not any(c in command for c in ("${args}", "${args_json_file}", "${args_no_hyphens}")):
        raise ValueError(f"{path}: the command passes no parameters (add ${{args}})")
    return sweep


def draw(parameters: dict[str, dict], rng: random.Random | None = None) -> dict[str, Any]:
    """One trial's values: ``value``, a choice from ``values``, or a draw from ``distribution``
    (uniform, log_uniform_values, int_uniform, q_uniform, q_log_uniform_values)."""
    rng = rng or random.Random()
    out = {}
    for name, spec in parameters.items():
        if "value" in spec:
            out[name] = spec["value"]
        elif "values" in spec:
            out[name] = rng.choice(spec["values"])
        else:
            kind = spec.get("distribution", "uniform")
            lo, hi = spec["min"], spec["max"]
            if kind == "int_uniform":
                out[name] = rng.randint(lo, hi)
            elif kind in ("uniform", "q_uniform"):
                value = rng.uniform(lo, hi)
                out[name] = round(value / spec["q"]) * spec["q"] if kind == "q_uniform" else value
            elif kind in ("log_uniform_values", "q_log_uniform_values"):
                value = math.exp(rng.uniform(math.log(lo), math.log(hi)))
                out[name] = round(value / spec["q"]) * spec["q"] if kind.startswith("q_") else value
            else:
                raise ValueError(f"parameter {name}: distribution {kind!r} is not supported by bg.sweeps.draw")
    return out


def agent_command(sweep: dict[str, Any], values: dict[str, Any], args_json_file: str | Path | None = None) -> list[str]:
    """The argv a W&B agent runs for a trial with ``values`` (see module docstring). When the command
    uses ``${args_json_file}``, the JSON is written to ``args_json_file``."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    command = create_sweep_command(list(sweep.get("command", DEFAULT_COMMAND)))  # ${envvar:X} macros
    macros: dict[str, list[str]] = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros["interpreter"] = ["python"]
    macros["program"] = [sweep.get("program", "")]
    macros["env"] = ["/usr/bin/env"]
    if "${args_json_file}" in command:
        if args_json_file is None:
            raise ValueError("the sweep command uses ${args_json_file}: give agent_command a path to write it to")
        Path(args_json_file).write_text(macros["args_json"][0])
        macros["args_json_file"] = [str(args_json_file)]
    argv: list[str] = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += [str(v) for v in macros.get(chunk[2:-1], [])]
        else:
            argv.append(chunk)
    return argv


def main(argv: list[str] | None = None) -> None:
    """``bg sweep-command FILE [--seed N]``: print one trial's command (a dry run of ``wandb agent``)."""
    import argparse
    import shlex

    parser = argparse.ArgumentParser(prog="bg sweep-command", description=main.__doc__)
    parser.add_argument("sweep", help="a sweep file, e.g. configs/sweeps/aldp_nsf.yaml")
    parser.add_argument("--seed", type=int, default=None, help="seed of the drawn values")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    values = draw(sweep["parameters"], random.Random(args.seed))
    print(json.dumps(values, indent=1))
    print(shlex.join(agent_command(sweep, values, args_json_file="trial_args.json")))
