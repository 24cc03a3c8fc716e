"""Evaluating a traced expression on torch tensors (the reference's arithmetic), and the
interval bounds that prove custom-input indices in range before a kernel runs.

Values broadcast as [B, H, rows, keys]: per-row values are [.., rows, 1], scalars 0-dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from attnrt.engine.spec import NEG_FLOOR
from attnrt.engine.trace import FLOAT, Expr

_TORCH: dict[str, Callable[..., torch.Tensor]] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "pow": torch.pow, "max": torch.maximum, "min": torch.minimum,
    "floordiv": lambda a, b: torch.div(a, b, rounding_mode="floor"), "mod": torch.remainder,
    "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq,
    "ne": torch.ne, "and": torch.logical_and, "or": torch.logical_or,
    "xor": torch.logical_xor, "not": torch.logical_not, "neg": torch.neg,
    "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "abs": torch.abs, "sqrt": torch.sqrt,
    "sign": torch.sign, "where": torch.where,
}


class TorchEval:
    """Evaluates expressions over `leaves` (name -> tensor) and custom `inputs` (name ->
    tensor) in float dtype `acc`; `keep` (bool, broadcastable) restricts row reductions."""

    def __init__(self, leaves: dict[str, Any], inputs: dict[str, torch.Tensor],
                 acc: torch.dtype, keep: torch.Tensor | None = None) -> None:
        self.leaves, self.inputs, self.acc, self.keep = leaves, inputs, acc, keep
        self.memo: dict[str, Any] = {}

    def __call__(self, expr: Expr) -> Any:
        key = expr.text
        if key not in self.memo:
            self.memo[key] = self._eval(expr)
        return self.memo[key]

    def _eval(self, expr: Expr) -> Any:
        if expr.op == "leaf":
            return self.leaves[expr.attr]
        if expr.op == "const":
            return expr.attr
        if expr.op == "input":
            index = tuple(_long(self(a)) for a in expr.args)
            return self.inputs[expr.attr][index].to(self.acc)
        if expr.op.startswith("reduce_"):
            return self._reduce(expr.op[7:], self(expr.args[0]))
        args = [self(a) for a in expr.args]
        if expr.kind == FLOAT or expr.op in ("max", "min", "where"):
            first = 1 if expr.op == "where" else 0  # the condition stays boolean
            args = args[:first] + [self._float(a, arg.kind == FLOAT or expr.kind == FLOAT)
                                   for a, arg in zip(args[first:], expr.args[first:],
                                                     strict=True)]
        if expr.op == "where":
            return torch.where(self._tensor(args[0]), self._tensor(args[1]),
                               self._tensor(args[2]))
        if expr.op in ("max", "min", "lt", "le", "gt", "ge", "eq", "ne", "and", "or", "xor",
                       "pow"):
            args = [self._tensor(a) for a in args]
        return _TORCH[expr.op](*args)

    def _float(self, value: Any, to_float: bool) -> Any:
        if not to_float:
            return value
        if isinstance(value, torch.Tensor):
            return value.to(self.acc) if not value.is_floating_point() else value
        return float(value)

    def _tensor(self, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        dtype = (torch.bool if isinstance(value, bool) else torch.int64
                 if isinstance(value, int) else self.acc)
        return torch.tensor(value, dtype=dtype, device=self.leaves["kv_idx"].device)

    def _reduce(self, how: str, x: Any) -> torch.Tensor:
        x = torch.broadcast_to(self._tensor(x), self.keep.shape if self.keep is not None
                               else self._tensor(x).shape)
        if how == "abssum":
            x = x.abs()
        if self.keep is not None:
            x = torch.where(self.keep, x, NEG_FLOOR if how == "max" else 0.0)
        if how == "max":
            return x.amax(-1, keepdim=True)
        return x.sum(-1, keepdim=True)


def _long(value: Any) -> Any:
    return value.long() if isinstance(value, torch.Tensor) else int(value)


# Interval bounds of integer index expressions, to prove custom-input reads in range.
Interval = tuple[float, float]


def bounds(expr: Expr, ranges: dict[str, Interval]) -> Interval:
    """Conservative [low, high] of an integer expression given its leaves' ranges."""
    if expr.op == "leaf":
        return ranges[expr.attr]
    if expr.op == "const":
        return float(expr.attr), float(expr.attr)
    args = [bounds(a, ranges) for a in expr.args]
    return _BOUNDS.get(expr.op, _unbounded)(*args)


def _unbounded(*args: Interval) -> Interval:
    return -math.inf, math.inf


def _mul(a: Interval, b: Interval) -> Interval:
    prods = [x * y for x in a for y in b if not (math.isinf(x) and y == 0 or
                                                 math.isinf(y) and x == 0)]
    return min(prods, default=0.0), max(prods, default=0.0)


def _floordiv(a: Interval, b: Interval) -> Interval:
    if b[0] <= 0 <= b[1]:
        return _unbounded()
    qs = [math.floor(x / y) if math.isfinite(x / y) else x / y for x in a for y in b]
    return min(qs), max(qs)


def _mod(a: Interval, b: Interval) -> Interval:
    if b[0] > 0:
        return 0.0, b[1] - 1
    return _unbounded()


def _abs(a: Interval) -> Interval:
    if a[0] >= 0:
        return a
    if a[1] <= 0:
        return -a[1], -a[0]
    return 0.0, max(-a[0], a[1])


_BOUNDS: dict[str, Callable[..., Interval]] = {
    "add": lambda a, b: (a[0] + b[0], a[1] + b[1]),
    "sub": lambda a, b: (a[0] - b[1], a[1] - b[0]),
    "neg": lambda a: (-a[1], -a[0]),
    "mul": _mul, "floordiv": _floordiv, "mod": _mod, "abs": _abs,
    "max": lambda a, b: (max(a[0], b[0]), max(a[1], b[1])),
    "min": lambda a, b: (min(a[0], b[0]), min(a[1], b[1])),
    "where": lambda c, a, b: (min(a[0], b[0]), max(a[1], b[1])),
    "sign": lambda a: (-1.0 if a[0] < 0 else 0.0 if a[0] == 0 else 1.0,
                       1.0 if a[1] > 0 else 0.0 if a[1] == 0 else -1.0),
}
