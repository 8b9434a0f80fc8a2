"""Command-line errors as one line: what is wrong, which input, and the fix (no traceback).

``UsageError`` is what every ``bg`` command raises for bad input; ``bg.cli.main`` prints it as
``bg <command>: error: <message>`` and exits with code 2. ``BG_DEBUG=1`` (or ``--debug``) re-raises
instead, with the traceback. ``explain_parser_error`` turns jsonargparse's multi-line messages (a union of
class paths, nested parser keys) into that line, with the nearest valid option name for a misspelled
one; ``check_config_files`` reads every ``--config`` file before LightningCLI does, so that a YAML error
names its file and line (jsonargparse names it ``"<unicode string>"``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from pathlib import Path

import yaml


class UsageError(Exception):
    """Bad input to a ``bg`` command; the message is one line naming the input and the fix."""


def debug_enabled(argv: list[str]) -> bool:
    """``--debug`` on the command line or ``BG_DEBUG`` set to a true value: show tracebacks."""
    return "--debug" in argv or os.environ.get("BG_DEBUG", "").lower() not in ("", "0", "false", "no")


def nearest(name: str, options: list[str]) -> str:
    """``; did you mean 'x'?`` for the option nearest to ``name``, or ``""``."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def class_options(class_path: str) -> list[str]:
    """The ``__init__`` parameter names of the class at ``class_path`` (``[]`` if it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names = []
    for klass in inspect.getmro(cls):  # options of **kwargs-forwarding subclasses live in their bases
        if "__init__" in vars(klass):
            names += [p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")]
    return list(dict.fromkeys(names))


def _type_name(text: str) -> str:
    text = re.sub(r"^an? ", "", text.strip())
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if literal:
        return f"one of {literal.group(1)}"
    cls = re.fullmatch(r"<class '([\w.]+)'>", text)
    return f"a value of type {cls.group(1).rpartition('.')[2]}" if cls else text


def explain_parser_error(message: str, subcommand: str | None = None, known: list[str] | None = None) -> str:
    """One line for a jsonargparse error ``message`` of ``bg <subcommand>`` (see module docstring); ``known``:
    the parser's option strings, for the nearest name to an unrecognized one."""
    help_hint = f" (bg {subcommand} --help lists the options)" if subcommand else ""
    text = message.strip()
    key = re.match(r'Parser key "([\w.]+)"', text)
    top = key.group(1) if key else None
    class_path = re.search(r"Problem with given class_path '([\w.]+)'", text)
    option = re.search(r"Option '([\w.]+)' is not accepted", text)
    if option:
        prefix = f"--{top}.init_args." if top else "--"
        options = class_options(class_path.group(1)) if class_path else []
        owner = class_path.group(1).rpartition(".")[2] if class_path else (top or "this command")
        return f"{prefix}{option.group(1)}: {owner} has no option '{option.group(1)}'{nearest(option.group(1), options)}" \
               f"{help_hint}"
    inner = re.findall(r'Parser key "([\w.]+)":\s*\n\s*(.+)', text)
    if inner:
        sub, detail = inner[-1]
        full = sub if not top or sub == top else (f"{top}.init_args.{sub}" if class_path else f"{top}.{sub}")
        expected = re.match(r"Expected (.+?)\. Got value: (.*)", detail)
        if expected:
            detail = f"expected {_type_name(expected.group(1))}, got {expected.group(2)!r}"
        return f"--{full}: {detail}{help_hint}"
    missing = re.search(r"File does not exist: '([^']+)'", text)
    if missing:
        return f"config file not found: {missing.group(1)}"
    unknown = re.match(r"unrecognized arguments: (.+)", text)
    if unknown:
        first_unknown = unknown.group(1).split()[0].split("=")[0]
        return f"unrecognized arguments: {unknown.group(1)}{nearest(first_unknown, known or [])}{help_hint}"
    first = text.splitlines()[0] if text else "invalid arguments"
    return f"{first}{help_hint}"


def explain_exception(exc: BaseException) -> str:
    """One line for an error raised while a command ran: a class's own message when jsonargparse wrapped it
    in a union-of-class-paths error while instantiating (e.g. ``data: batch_size must be ≥ 1``)."""
    if isinstance(exc, FileNotFoundError) and exc.filename and exc.strerror:  # "[Errno 2] No such file …: 'x'"
        return f"{exc.filename}: no such file"
    text = str(exc).strip()
    if "Does not validate against any of the Union subtypes" in text:
        first = re.search(r"Errors:\s*\n\s*- (.+?)(?=\n\s*- |\n\s*Given value|\Z)", text, re.S)
        if first:
            text = first.group(1)
    return " ".join(text.split()) or type(exc).__name__


def config_files(argv: list[str]) -> list[str]:
    """The files given to ``--config``/``-c`` in ``argv``, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_files(argv: list[str]) -> None:
    """Raise ``UsageError`` naming the file (and line) of a missing or malformed ``--config`` file."""
    for name in config_files(argv):
        path = Path(name)
        if not path.is_file():
            configs = sorted(str(p) for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
            hint = nearest(name, configs) or (f"; configs here: {', '.join(configs[:6])}" if configs else "")
            raise UsageError(f"--config {name}: no such file{hint}")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UsageError(f"--config {name}{where}: YAML syntax error: {problem}") from exc
        if content is not None and not isinstance(content, dict):
            raise UsageError(f"--config {name}: expected a mapping of options (key: value), got a "
                             f"{type(content).__name__}")
