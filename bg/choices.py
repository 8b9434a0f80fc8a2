"""Choices are declared once, as ``typing.Literal`` types; this module checks values against them.

jsonargparse validates and documents ``Literal`` parameters on the command line and in configs;
:func:`check_choices` gives Python callers the same one-line error from the same declaration.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Callable, Literal, get_args, get_origin


def literal_choices(annotation: Any) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` (or ``Optional[Literal]``) annotation; ``()`` for other types."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(v for arg in get_args(annotation) for v in literal_choices(arg))
    return ()


def check_choices(fn: Callable, values: dict[str, Any], prefix: str = "") -> None:
    """Raise ``ValueError`` naming the option if a value in ``values`` is not one of the ``Literal``
    choices that ``fn``'s signature declares for it (``None`` passes for ``Optional`` options)."""
    hints = typing.get_type_hints(fn)
    for name, value in values.items():
        choices = literal_choices(hints.get(name))
        if choices and value is not None and value not in choices:
            raise ValueError(f"{prefix}{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
