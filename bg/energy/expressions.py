"""OpenMM (Lepton) energy expressions evaluated on torch tensors.

Custom forces in OpenMM carry their physics as expression strings such as
``"1/(1/or-tanh(psi-0.8*psi^2+4.85*psi^3)/radius);psi=I*or; radius=or+offset; offset=0.009"``:
a main expression followed by ``name=value`` definitions, which may refer to each other in any
order. :class:`Expression` parses one such string once (Python's ``ast`` after ``^`` → ``**``,
accepting only arithmetic, numbers, names and Lepton's functions) and evaluates it on tensors, so
that a torch force field reproduces whatever expression the OpenMM System holds.
"""

from __future__ import annotations

import ast
import keyword
import math
import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor


def _step(x: Tensor) -> Tensor:
    return (x >= 0).to(x.dtype) if isinstance(x, Tensor) else float(x >= 0)


def _delta(x: Tensor) -> Tensor:
    return (x == 0).to(x.dtype) if isinstance(x, Tensor) else float(x == 0)


def _select(c, a, b):
    if isinstance(c, Tensor) or isinstance(a, Tensor) or isinstance(b, Tensor):
        c, a, b = (torch.as_tensor(v) for v in (c, a, b))
        return torch.where(c != 0, a, b)
    return a if c != 0 else b


def _t(fn_tensor: Callable, fn_float: Callable) -> Callable:
    return lambda x: fn_tensor(x) if isinstance(x, Tensor) else fn_float(x)


def _minmax(fn_tensor: Callable, fn_float: Callable) -> Callable:
    def f(a, b):
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            a, b = torch.as_tensor(a), torch.as_tensor(b)
            return fn_tensor(a, b)
        return fn_float(a, b)

    return f


#: Lepton's functions. Tabulated functions and ``periodicdistance`` are not supported.
FUNCTIONS: dict[str, Callable] = {
    "sqrt": _t(torch.sqrt, math.sqrt), "exp": _t(torch.exp, math.exp), "log": _t(torch.log, math.log),
    "sin": _t(torch.sin, math.sin), "cos": _t(torch.cos, math.cos), "tan": _t(torch.tan, math.tan),
    "sec": lambda x: 1 / FUNCTIONS["cos"](x), "csc": lambda x: 1 / FUNCTIONS["sin"](x),
    "cot": lambda x: 1 / FUNCTIONS["tan"](x),
    "asin": _t(torch.asin, math.asin), "acos": _t(torch.acos, math.acos), "atan": _t(torch.atan, math.atan),
    "atan2": _minmax(torch.atan2, math.atan2),
    "sinh": _t(torch.sinh, math.sinh), "cosh": _t(torch.cosh, math.cosh), "tanh": _t(torch.tanh, math.tanh),
    "erf": _t(torch.erf, math.erf), "erfc": _t(torch.erfc, math.erfc),
    "step": _step, "delta": _delta, "select": _select,
    "square": lambda x: x * x, "cube": lambda x: x * x * x, "recip": lambda x: 1 / x,
    "min": _minmax(torch.minimum, min), "max": _minmax(torch.maximum, max),
    "abs": _t(torch.abs, abs), "floor": _t(torch.floor, math.floor), "ceil": _t(torch.ceil, math.ceil),
}

_BINOPS = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a**b,
}


_IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")
_KW_SUFFIX = "__kw"


def _mangle(source: str) -> str:
    # OpenMM names such as `or` (offset radius) are Python keywords: rename them for `ast`.
    return _IDENT.sub(lambda m: m.group(0) + _KW_SUFFIX if keyword.iskeyword(m.group(0)) else m.group(0), source)


def _unmangle(name: str) -> str:
    return name[: -len(_KW_SUFFIX)] if name.endswith(_KW_SUFFIX) else name


class ExpressionError(ValueError):
    """An expression uses syntax or functions that cannot be evaluated here."""


class Expression:
    """One OpenMM expression string, evaluated on a mapping of variable name → tensor/float.

    ``variables`` lists the free names the expression needs (after its own definitions).
    """

    def __init__(self, text: str):
        self.text = text
        parts = [p.strip() for p in text.split(";") if p.strip()]
        if not parts:
            raise ExpressionError("empty expression")
        self._main = self._parse(parts[0])
        self._defs: dict[str, ast.AST] = {}
        for part in parts[1:]:
            name, sep, value = part.partition("=")
            if not sep or not name.strip().isidentifier():
                raise ExpressionError(f"cannot read the definition {part!r} in {text!r}")
            self._defs[name.strip()] = self._parse(value)
        names: set[str] = set()
        for node in [self._main, *self._defs.values()]:
            names |= {_unmangle(n.id) for n in ast.walk(node) if isinstance(n, ast.Name)}
        self.variables = frozenset(names - set(self._defs) - set(FUNCTIONS))

    def _parse(self, source: str) -> ast.AST:
        try:
            tree = ast.parse(_mangle(source).replace("^", "**"), mode="eval").body
        except SyntaxError as exc:
            raise ExpressionError(f"cannot parse {source!r}: {exc.msg}") from exc
        for node in ast.walk(tree):
            ok = isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Constant, ast.Load,
                                   ast.operator, ast.unaryop))
            if isinstance(node, ast.BinOp) and type(node.op) not in _BINOPS:
                ok = False
            if isinstance(node, ast.UnaryOp) and not isinstance(node.op, (ast.USub, ast.UAdd)):
                ok = False
            if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS):
                name = node.func.id if isinstance(node.func, ast.Name) else ast.dump(node.func)
                raise ExpressionError(f"function {name!r} in {source!r} is not supported (tabulated functions are not)")
            if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float)):
                ok = False
            if not ok:
                raise ExpressionError(f"unsupported syntax {type(node).__name__} in {source!r}")
        return tree

    def __call__(self, env: Mapping[str, Tensor | float]) -> Tensor | float:
        missing = self.variables - set(env)
        if missing:
            raise ExpressionError(f"expression {self.text!r} needs values for {sorted(missing)}")
        memo: dict[str, Tensor | float] = {}

        def value(name: str):
            if name in self._defs:
                if name not in memo:
                    memo[name] = ev(self._defs[name])
                return memo[name]
            return env[name]

        def ev(node: ast.AST):
            if isinstance(node, ast.Constant):
                return float(node.value)
            if isinstance(node, ast.Name):
                return value(_unmangle(node.id))
            if isinstance(node, ast.UnaryOp):
                v = ev(node.operand)
                return -v if isinstance(node.op, ast.USub) else v
            if isinstance(node, ast.BinOp):
                return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
            assert isinstance(node, ast.Call)
            return FUNCTIONS[node.func.id](*[ev(a) for a in node.args])

        return ev(self._main)
