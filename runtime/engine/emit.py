"""Printing traced expressions as Triton code, and differentiating them symbolically.

Inside a kernel every value is a scalar, a row [BLOCK_M, 1], a key column [1, BLOCK_N] or a
block [BLOCK_M, BLOCK_N]; they broadcast like the torch reference's [.., rows, keys].
Float arithmetic is float32, indices int32. Integer // and % follow Python (floor) on both the
GPU (where Triton truncates) and the interpreter (where numpy floors).
"""

from __future__ import annotations

import math

from attnrt.engine.errors import TraceError
from attnrt.engine.spec import NEG_FLOOR
from attnrt.engine.trace import BOOL, FLOAT, INT, Expr, const, make, where

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "lt": "<", "le": "<=", "gt": ">",
          "ge": ">=", "eq": "==", "ne": "!=", "and": "&", "or": "|", "xor": "^"}
# op -> function of the dialect's namespace (Emitter.ns: "tl" for Triton, "gl" for Gluon)
_CALL = {"exp": "exp", "exp2": "exp2", "log": "log", "log2": "log2", "sigmoid": "sigmoid",
         "abs": "abs", "sqrt": "sqrt", "max": "maximum", "min": "minimum", "where": "where"}


def literal(value: object, kind: str) -> str:
    if kind == BOOL:
        return "True" if value else "False"
    if kind == INT:
        return str(int(value))  # type: ignore[call-overload]
    v = float(value)  # type: ignore[arg-type]
    if math.isnan(v):
        return 'float("nan")'
    if math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    return repr(v)


class Emitter:
    """Emits one straight-line code block. `names` maps leaves to Triton variables, `inputs`
    custom-input names to (pointer, stride names); `keep` names the block's keep mask (None:
    every key kept) for row reductions. `ns` is the language module's name in the generated
    text (subclasses print other dialects: engine/gluon_codegen.py)."""

    ns = "tl"

    def __init__(self, names: dict[str, str], inputs: dict[str, tuple[str, list[str]]],
                 keep: str | None, prefix: str, fast_tanh: bool = False) -> None:
        self.names, self.inputs, self.keep, self.prefix = names, inputs, keep, prefix
        self.fast_tanh = fast_tanh  # tanh as one PTX tanh.approx.f32 (CUDA only)
        self.lines: list[str] = []
        self.memo: dict[str, str] = {}
        self.count = 0

    def line(self, text: str) -> None:
        self.lines.append(text)

    def __call__(self, expr: Expr, as_float: bool = False) -> str:
        code = self._value(expr)
        if as_float and expr.kind != FLOAT:
            if expr.op == "const":
                return literal(expr.attr, FLOAT)
            return f"{code}.to({self.ns}.float32)"
        return code

    def _value(self, expr: Expr) -> str:
        if expr.op == "const":
            return literal(expr.attr, expr.kind)
        if expr.op == "leaf":
            if expr.attr not in self.names:
                raise TraceError(f"{expr.attr} cannot be read here")
            return self.names[expr.attr]
        key = expr.text
        if key not in self.memo:
            self.memo[key] = self.temp(self._code(expr))
        return self.memo[key]

    def _code(self, e: Expr) -> str:
        split = distributed(e)
        if split is not None:
            return self(split)
        float_args = e.kind == FLOAT and e.op != "input" or e.op in ("max", "min", "where") and any(
            a.kind == FLOAT for a in e.args[1 if e.op == "where" else 0:])
        args = [self(a, as_float=float_args and (e.op != "where" or i > 0))
                for i, a in enumerate(e.args)]
        if e.op == "input":
            return self._load(e, args)
        if e.op.startswith("reduce_"):
            return self._reduce(e.op[7:], args[0])
        if e.op in _INFIX:
            return f"({args[0]} {_INFIX[e.op]} {args[1]})"
        if e.op in _CALL:
            return f"{self.ns}.{_CALL[e.op]}({', '.join(args)})"
        return _SPECIAL[e.op](self, e, args)

    def _load(self, e: Expr, args: list[str]) -> str:
        ptr, strides = self.inputs[e.attr]
        offset = " + ".join(f"({a}) * {s}" for a, s in zip(args, strides, strict=True))
        return f"{self.ns}.load({ptr} + {offset}).to({self.ns}.float32)"

    def _reduce(self, how: str, x: str) -> str:
        full = f"tl.broadcast_to({x}, [BLOCK_M, BLOCK_N])"
        if how == "abssum":
            full = f"tl.abs({full})"
        if self.keep is not None:
            fill = literal(NEG_FLOOR, FLOAT) if how == "max" else "0.0"
            full = f"tl.where({self.keep}, {full}, {fill})"
        op = "tl.max" if how == "max" else "tl.sum"
        return f"{op}({full}, 1, keep_dims=True)"

    def temp(self, code: str) -> str:
        var = f"{self.prefix}{self.count}"
        self.count += 1
        self.line(f"{var} = {code}")
        return var

    def rebind(self, leaf_name: str, var: str) -> None:
        """Point a leaf at a new variable; values computed from the old one are forgotten."""
        self.names[leaf_name] = var
        self.memo.clear()


_ROWS, _COLS = frozenset({"r"}), frozenset({"c"})


def _axes(e: Expr) -> frozenset[str]:
    """The tile axes e varies along: "r" (query rows: q_idx), "c" (key columns: kv_idx);
    b, h and custom inputs indexed by them are per program. Any other leaf (the score, row
    state, dP) varies along both."""
    axes: set[str] = set()
    for name in e.leaves():
        if name == "q_idx":
            axes.add("r")
        elif name == "kv_idx":
            axes.add("c")
        elif name not in ("b", "h") and not name.startswith("in."):
            return frozenset({"r", "c"})
    return frozenset(axes)


def distributed(e: Expr) -> Expr | None:
    """c * (a -/+ b) as c*a -/+ c*b where c is per program and a, b each vary along one tile
    axis (ALiBi's slope * (kv_idx - q_idx)): the products are then computed on a row and a
    column of the tile, and each score pays one subtract instead of an integer subtract, a
    conversion and a multiply. None where the pattern does not apply (floats only: the sum
    of the products may round differently from the product of the difference, by an ulp)."""
    if e.op != "mul" or e.kind != FLOAT:
        return None
    for c, d in ((e.args[0], e.args[1]), (e.args[1], e.args[0])):
        if d.op in ("sub", "add") and not _axes(c):
            a, b = (_axes(x) for x in d.args)
            if {a, b} in ({_ROWS, _COLS}, {_ROWS, frozenset()}, {_COLS, frozenset()}):
                return make(d.op, make("mul", c, d.args[0]), make("mul", c, d.args[1]))
    return None


def _floor_quotient(em: Emitter, a: str, b: str) -> str:
    # Triton truncates integer division on the GPU, numpy floors in the interpreter: correct
    # a truncated quotient where the remainder's sign differs from the divisor's.
    q = em.temp(f"{a} // {b}")
    r = em.temp(f"{a} - {q} * {b}")
    return em.temp(f"{q} - ((({r}) != 0) & ((({r}) < 0) != (({b}) < 0))).to({em.ns}.int32)")


def _pow(em: Emitter, e: Expr, args: list[str]) -> str:
    base, exponent = args
    power = e.args[1]
    if power.op == "const" and float(power.attr) == int(power.attr) and 0 <= power.attr <= 4:
        return " * ".join([f"({base})"] * int(power.attr)) or "1.0"
    if power.op == "const" and power.attr == 0.5:
        return f"{em.ns}.sqrt({base})"
    return f"{em.ns}.exp2({exponent} * {em.ns}.log2({base}))"  # defined for base > 0, as documented


def _tanh(em: Emitter, e: Expr, args: list[str]) -> str:
    # tanh(x) = sign(x) (1 - exp(-2|x|)) / (1 + exp(-2|x|)); libdevice's tanh has no
    # interpreter twin, and this form never overflows. It costs two special-function ops (exp,
    # reciprocal); fast_tanh emits PTX's tanh.approx.f32 (one; max relative error 2^-11, as
    # FlashAttention's soft-capping uses), which only a CUDA GPU runs.
    x = args[0]
    if em.fast_tanh:
        return (f'{em.ns}.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", '
                f'[({x}).to({em.ns}.float32)], dtype={em.ns}.float32, is_pure=True, pack=1)')
    t = em.temp(f"{em.ns}.exp(-2.0 * {em.ns}.abs({x}))")
    return f"{em.ns}.where({x} < 0, -1.0, 1.0) * (1.0 - {t}) / (1.0 + {t})"


_SPECIAL = {
    "neg": lambda em, e, a: f"(-{a[0]})",
    "not": lambda em, e, a: f"({a[0]} == 0)",
    "floordiv": lambda em, e, a: _floor_quotient(em, *a),
    "mod": lambda em, e, a: f"({a[0]} - {_floor_quotient(em, *a)} * {a[1]})",
    "pow": _pow,
    "tanh": _tanh,
    "sign": lambda em, e, a: (f"{em.ns}.where({a[0]} > 0, 1, {em.ns}.where({a[0]} < 0, -1, 0))"
                              if e.kind == INT else f"{em.ns}.where({a[0]} > 0, 1.0, "
                              f"{em.ns}.where({a[0]} < 0, -1.0, 0.0))"),
}


# Symbolic differentiation.
def _add(a: Expr, b: Expr) -> Expr:
    if _is(a, 0):
        return b
    return a if _is(b, 0) else make("add", a, b)


def _mul(a: Expr, b: Expr) -> Expr:
    if _is(a, 0) or _is(b, 0):
        return const(0.0)
    if _is(a, 1):
        return b
    return a if _is(b, 1) else make("mul", a, b)


def _is(e: Expr, value: float) -> bool:
    return e.op == "const" and e.kind != BOOL and float(e.attr) == value


def diff(expr: Expr, wrt: str, memo: dict[str, Expr] | None = None) -> Expr:
    """d expr / d (the node whose canonical text is `wrt`), as an expression."""
    memo = {} if memo is None else memo
    key = expr.text
    if key not in memo:
        memo[key] = _diff(expr, wrt, memo)
    return memo[key]


def _diff(e: Expr, wrt: str, memo: dict[str, Expr]) -> Expr:
    if e.text == wrt:
        return const(1.0)
    if e.kind != FLOAT or e.op in ("leaf", "const", "input", "sign"):
        return const(0.0)
    d = [diff(a, wrt, memo) for a in e.args]
    a = e.args
    rule = _RULES.get(e.op)
    if rule is None:
        raise TraceError(f"score_mod uses {e.op}, which the backward cannot differentiate")
    return rule(e, a, d)


_LN2 = math.log(2.0)
_RULES = {
    "add": lambda e, a, d: _add(d[0], d[1]),
    "sub": lambda e, a, d: _add(d[0], _mul(const(-1.0), d[1])),
    "neg": lambda e, a, d: _mul(const(-1.0), d[0]),
    "mul": lambda e, a, d: _add(_mul(d[0], a[1]), _mul(a[0], d[1])),
    "div": lambda e, a, d: _add(_mul(d[0], make("div", 1.0, a[1])),
                                _mul(d[1], make("neg", make("div", e, a[1])))),
    "exp": lambda e, a, d: _mul(e, d[0]),
    "exp2": lambda e, a, d: _mul(_mul(e, const(_LN2)), d[0]),
    "log": lambda e, a, d: _mul(make("div", 1.0, a[0]), d[0]),
    "log2": lambda e, a, d: _mul(make("div", 1.0 / _LN2, a[0]), d[0]),
    "tanh": lambda e, a, d: _mul(make("sub", 1.0, make("mul", e, e)), d[0]),
    "sigmoid": lambda e, a, d: _mul(make("mul", e, make("sub", 1.0, e)), d[0]),
    "abs": lambda e, a, d: _mul(make("sign", a[0]), d[0]),
    "sqrt": lambda e, a, d: _mul(make("div", 0.5, e), d[0]),
    "max": lambda e, a, d: where(make("ge", a[0], a[1]), d[0], d[1]),
    "min": lambda e, a, d: where(make("le", a[0], a[1]), d[0], d[1]),
    "where": lambda e, a, d: where(a[0], d[1], d[2]),
    "pow": lambda e, a, d: _pow_rule(e, a, d),
}


def _pow_rule(e: Expr, a: tuple[Expr, ...], d: list[Expr]) -> Expr:
    if not _is(d[1], 0):
        return _add(_mul(_mul(e, make("log", a[0])), d[1]),
                    _mul(make("mul", a[1], make("pow", a[0], make("sub", a[1], 1.0))), d[0]))
    return _mul(make("mul", a[1], make("pow", a[0], make("sub", a[1], 1.0))), d[0])
