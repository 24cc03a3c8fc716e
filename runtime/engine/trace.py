"""Tracing user functions into expression graphs.

A user's score_mod, mask_mod and OnlineFunc methods are called once with symbolic values
(`Expr`) in place of tensors: every arithmetic operation, comparison, `torch.where`, `torch.exp`
and friends, and every read of a custom input (`custom_fwd_inputs["bias"][h, q_idx - kv_idx]`)
builds a node instead of computing. The graph is then evaluated on torch tensors
(engine/reference.py) or printed as Triton code (engine/codegen.py).

What cannot be traced is refused with a `TraceError` that names the function and the user's
line: Python control flow on a traced value (`if score > 0:`), `float(score)`, `math.exp(score)`,
operations outside the supported set.

Each node has a canonical text (`Expr.text`), the same for equal expressions; the engine's
compiled-kernel cache is keyed by it.
"""

from __future__ import annotations

import contextvars
import inspect
import math
import os
import traceback
from collections.abc import Callable
from typing import Any

from attnrt.engine.errors import TraceError

FLOAT, INT, BOOL = "float", "int", "bool"
# Leaves: the score block, its indices, and the online function's own values.
INDEX_LEAVES = ("b", "h", "q_idx", "kv_idx")
# Leaves that vary along the key axis of a block (everything else is per row or scalar).
_KV_LEAVES = frozenset({"score", "kv_idx", "p", "dp"})
_CURRENT = contextvars.ContextVar("attnrt_engine_tracing", default="a traced function")
_ENGINE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(str(__import__("torch").__file__)))


def user_line(frames: list[traceback.FrameSummary] | None = None) -> str:
    """'file:line: code' of the innermost frame outside attnrt's engine and torch."""
    for frame in reversed(frames if frames is not None else traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if not path.startswith((_ENGINE_DIR, _TORCH_DIR)):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return "<unknown line>"


def _refuse(problem: str) -> TraceError:
    return TraceError(f"{_CURRENT.get()} cannot be traced: {problem} (at {user_line()})")


class Expr:
    """A traced value: op, argument nodes, an attribute (constant value, leaf or input name)
    and a kind (float, int or bool)."""

    __slots__ = ("_kv", "_text", "args", "attr", "kind", "op")
    __array_priority__ = 1000

    def __init__(self, op: str, args: tuple[Expr, ...] = (), attr: Any = None,
                 kind: str = FLOAT) -> None:
        self.op, self.args, self.attr, self.kind = op, args, attr, kind
        self._text: str | None = None
        self._kv: bool | None = None

    @property
    def text(self) -> str:
        """Canonical text: equal for equal expressions (the cache key's source)."""
        if self._text is None:
            if self.op == "leaf":
                self._text = str(self.attr)
            elif self.op == "const":
                self._text = repr(self.attr)
            elif self.op == "input":
                self._text = f"{self.attr}[{', '.join(a.text for a in self.args)}]"
            else:
                self._text = f"{self.op}({', '.join(a.text for a in self.args)})"
        return self._text

    def __repr__(self) -> str:
        return f"Expr<{self.kind}>({self.text})"

    @property
    def varies_along_kv(self) -> bool:
        """Whether the value differs between keys of one row (else it is per row or scalar)."""
        if self._kv is None:
            if self.op == "leaf":
                self._kv = self.attr in _KV_LEAVES
            elif self.op.startswith("reduce_"):
                self._kv = False
            else:
                self._kv = any(a.varies_along_kv for a in self.args)
        return self._kv

    def leaves(self) -> set[str]:
        """Names of the leaves (and `in.<name>` of custom inputs) this expression reads."""
        found: set[str] = set()
        stack, seen = [self], set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "leaf":
                found.add(node.attr)
            elif node.op == "input":
                found.add(f"in.{node.attr}")
            stack.extend(node.args)
        return found

    # Python control flow and conversions cannot be traced.
    def __bool__(self) -> bool:
        raise _refuse("Python control flow on a traced value (`if`, `and`, `or`, `not`, a "
                      "comparison chain); use torch.where(cond, a, b) or & | ~ instead")

    def __float__(self) -> float:
        raise _refuse("float() of a traced value (math.* functions call it); use the "
                      "tensor method or torch function, e.g. score.exp() or torch.exp(score)")

    def __int__(self) -> int:
        raise _refuse("int() of a traced value")

    def __index__(self) -> int:
        raise _refuse("a traced value used as a Python index or size")

    def __iter__(self) -> Any:
        raise _refuse("iterating a traced value")

    def __len__(self) -> int:
        raise _refuse("len() of a traced value")

    def __getitem__(self, index: Any) -> Expr:
        raise _refuse(f"indexing {self.text}; only custom inputs can be indexed")

    # Arithmetic and comparisons build nodes.
    def __add__(self, o: Any) -> Expr: return make("add", self, o)
    def __radd__(self, o: Any) -> Expr: return make("add", o, self)
    def __sub__(self, o: Any) -> Expr: return make("sub", self, o)
    def __rsub__(self, o: Any) -> Expr: return make("sub", o, self)
    def __mul__(self, o: Any) -> Expr: return make("mul", self, o)
    def __rmul__(self, o: Any) -> Expr: return make("mul", o, self)
    def __truediv__(self, o: Any) -> Expr: return make("div", self, o)
    def __rtruediv__(self, o: Any) -> Expr: return make("div", o, self)
    def __floordiv__(self, o: Any) -> Expr: return make("floordiv", self, o)
    def __rfloordiv__(self, o: Any) -> Expr: return make("floordiv", o, self)
    def __mod__(self, o: Any) -> Expr: return make("mod", self, o)
    def __rmod__(self, o: Any) -> Expr: return make("mod", o, self)
    def __pow__(self, o: Any) -> Expr: return make("pow", self, o)
    def __rpow__(self, o: Any) -> Expr: return make("pow", o, self)
    def __neg__(self) -> Expr: return make("neg", self)
    def __pos__(self) -> Expr: return self
    def __abs__(self) -> Expr: return make("abs", self)
    def __lt__(self, o: Any) -> Expr: return make("lt", self, o)
    def __le__(self, o: Any) -> Expr: return make("le", self, o)
    def __gt__(self, o: Any) -> Expr: return make("gt", self, o)
    def __ge__(self, o: Any) -> Expr: return make("ge", self, o)
    def __eq__(self, o: Any) -> Expr: return make("eq", self, o)  # type: ignore[override]
    def __ne__(self, o: Any) -> Expr: return make("ne", self, o)  # type: ignore[override]
    def __and__(self, o: Any) -> Expr: return make("and", self, o)
    def __rand__(self, o: Any) -> Expr: return make("and", o, self)
    def __or__(self, o: Any) -> Expr: return make("or", self, o)
    def __ror__(self, o: Any) -> Expr: return make("or", o, self)
    def __xor__(self, o: Any) -> Expr: return make("xor", self, o)
    def __invert__(self) -> Expr: return make("not", self)
    __hash__ = object.__hash__

    # Tensor-style methods (AttentionEngine's SymbolScalar spells these the same way).
    def exp(self) -> Expr: return make("exp", self)
    def exp2(self) -> Expr: return make("exp2", self)
    def log(self) -> Expr: return make("log", self)
    def log2(self) -> Expr: return make("log2", self)
    def tanh(self) -> Expr: return make("tanh", self)
    def sigmoid(self) -> Expr: return make("sigmoid", self)
    def abs(self) -> Expr: return make("abs", self)
    def sqrt(self) -> Expr: return make("sqrt", self)
    def sign(self) -> Expr: return make("sign", self)
    def max(self, other: Any) -> Expr: return make("max", self, other)
    def min(self, other: Any) -> Expr: return make("min", self, other)
    def relu(self) -> Expr: return _relu(self)

    def clamp(self, min: Any = None, max: Any = None) -> Expr:  # noqa: A002 - torch's names
        out = self if min is None else make("max", self, min)
        return out if max is None else make("min", out, max)

    def get_reduce(self, op: str) -> Expr:
        """Row reduction over the keys of the block ("sum", "max" or "abssum"), as in
        AttentionEngine's SymbolicArray; masked keys take no part."""
        if op not in ("sum", "max", "abssum"):
            raise _refuse(f"get_reduce({op!r}); allowed: 'sum', 'max', 'abssum'")
        if not self.varies_along_kv:
            raise _refuse(f"get_reduce on {self.text}, which does not vary along the keys")
        return Expr(f"reduce_{op}", (as_expr(self),), kind=FLOAT)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        handler = _TORCH_FUNCS.get(getattr(func, "__name__", ""))
        if handler is None:
            return NotImplemented
        return handler(*args, **(kwargs or {}))


def leaf(name: str, kind: str = FLOAT) -> Expr:
    return Expr("leaf", attr=name, kind=kind)


def const(value: float | int | bool) -> Expr:
    if isinstance(value, bool):
        return Expr("const", attr=value, kind=BOOL)
    if isinstance(value, int):
        return Expr("const", attr=value, kind=INT)
    return Expr("const", attr=float(value), kind=FLOAT)


def as_expr(value: Any) -> Expr:
    """A node for a traced value or a Python number."""
    if isinstance(value, InputRef):
        return value.broadcast()
    if isinstance(value, Expr):
        return value
    if isinstance(value, bool | int | float):
        return const(value)
    raise _refuse(f"{type(value).__name__} value {value!r:.60} in an expression; allowed: traced "
                  "values and Python numbers (tensors cannot be captured: declare them in "
                  "custom_fwd_inputs)")


_FLIPPED = {"gt": "lt", "ge": "le"}
_COMPARE = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})
_LOGIC = frozenset({"and", "or", "xor", "not"})
_INT_KEEPING = frozenset({"add", "sub", "mul", "floordiv", "mod", "max", "min", "neg", "abs",
                          "sign"})
_PY: dict[str, Callable[..., Any]] = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b if b else math.copysign(math.inf, a) if a else math.nan,
    "floordiv": lambda a, b: a // b, "mod": lambda a, b: a % b, "pow": lambda a, b: a ** b,
    "max": max, "min": min, "neg": lambda a: -a, "abs": abs,
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b, "eq": lambda a, b: a == b, "ne": lambda a, b: a != b,
    "and": lambda a, b: a and b, "or": lambda a, b: a or b, "xor": lambda a, b: a != b,
    "not": lambda a: not a,
}


def _kind(op: str, args: tuple[Expr, ...]) -> str:
    if op in _COMPARE:
        return BOOL
    if op in _LOGIC:
        if any(a.kind != BOOL for a in args):
            raise _refuse(f"`{op}` of non-boolean values; & | ^ ~ combine comparisons only")
        return BOOL
    if op == "where":
        kinds = {a.kind for a in args[1:]}
        return FLOAT if FLOAT in kinds or len(kinds) > 1 and BOOL in kinds else kinds.pop()
    if op in _INT_KEEPING and all(a.kind in (INT, BOOL) for a in args):
        return INT
    return FLOAT


def make(op: str, *values: Any) -> Expr:
    """A node `op(values...)`, folded when every argument is a constant."""
    args = tuple(as_expr(v) for v in values)
    if op in _FLIPPED:  # one spelling per comparison: a > b is b < a, so both share a key
        op, args = _FLIPPED[op], args[::-1]
    if op in ("floordiv", "mod") and any(a.kind == FLOAT for a in args):
        raise _refuse(f"`{op}` of floating values; // and % are for integer indices")
    if op == "where" and args[0].kind != BOOL:
        raise _refuse("torch.where with a non-boolean condition")
    kind = _kind(op, args)
    if op in _PY and all(a.op == "const" for a in args):
        value = _PY[op](*(a.attr for a in args))
        return const(bool(value) if kind == BOOL else int(value) if kind == INT
                     else float(value))
    return Expr(op, args, kind=kind)


def where(cond: Any, a: Any, b: Any) -> Expr:
    cond = as_expr(cond)
    if cond.op == "const":
        return as_expr(a) if cond.attr else as_expr(b)
    return make("where", cond, a, b)


def _unary(op: str) -> Callable[..., Expr]:
    return lambda x, *rest, **kw: make(op, x)


def _binary(op: str) -> Callable[..., Expr]:
    return lambda x, y, *rest, **kw: make(op, x, y)


def _clamp(x: Any, min: Any = None, max: Any = None) -> Expr:  # noqa: A002 - torch's names
    return as_expr(x).clamp(min, max)


def _relu(x: Any, inplace: bool = False) -> Expr:
    """where(x > 0, x, 0): its derivative is 0 at 0, as torch's."""
    return where(make("gt", x, 0.0), x, 0.0)


def _elu(x: Any, alpha: float = 1.0, inplace: bool = False) -> Expr:
    return where(make("gt", x, 0.0), x, make("mul", alpha, make("sub", make("exp", x), 1.0)))


_TORCH_FUNCS: dict[str, Callable[..., Expr]] = {
    **{name: _unary(name) for name in ("exp", "exp2", "log", "log2", "tanh", "sigmoid", "abs",
                                       "sqrt", "sign")},
    "neg": _unary("neg"), "negative": _unary("neg"),
    "maximum": _binary("max"), "minimum": _binary("min"), "fmax": _binary("max"),
    "fmin": _binary("min"), "add": _binary("add"), "sub": _binary("sub"),
    "mul": _binary("mul"), "div": _binary("div"), "pow": _binary("pow"),
    "clamp": _clamp, "clip": _clamp, "relu": _relu, "elu": _elu,
    "where": lambda c, a, b: where(c, a, b),
    "logical_and": _binary("and"), "logical_or": _binary("or"), "logical_not": _unary("not"),
    "__add__": _binary("add"), "__sub__": _binary("sub"), "__mul__": _binary("mul"),
}


class InputRef:
    """A custom input in a traced function: index it (`bias[h, q_idx - kv_idx]`) or use it
    directly, where its declared shape broadcasts against the scores (dims 1, "batch",
    "heads", "seq_len", "seq_len_kv")."""

    _BROADCAST = {"batch": "b", "heads": "h", "seq_len": "q_idx", "seq_len_kv": "kv_idx"}

    def __init__(self, name: str, shape: tuple) -> None:
        self.name, self.shape = name, tuple(shape)

    def __getitem__(self, index: Any) -> Expr:
        index = index if isinstance(index, tuple) else (index,)
        if len(index) != len(self.shape):
            raise _refuse(f"custom input {self.name!r} read with {len(index)} indices; it is "
                          f"declared with {len(self.shape)} dims {self.shape}")
        args = tuple(as_expr(i) for i in index)
        for i in args:
            if i.kind == FLOAT:
                raise _refuse(f"custom input {self.name!r} indexed by a floating value {i.text}")
        return Expr("input", args, attr=self.name, kind=FLOAT)

    def broadcast(self) -> Expr:
        index = []
        for dim in self.shape:
            if dim == 1:
                index.append(const(0))
            elif dim in self._BROADCAST:
                index.append(leaf(self._BROADCAST[dim], INT))
            else:
                raise _refuse(f"custom input {self.name!r} of declared shape {self.shape} used "
                              "without an index; dims broadcast only when 1, 'batch', 'heads', "
                              "'seq_len' or 'seq_len_kv': index it, e.g. x[h]")
        return Expr("input", tuple(index), attr=self.name, kind=FLOAT)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.broadcast(), name)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        args = tuple(a.broadcast() if isinstance(a, InputRef) else a for a in args)
        return Expr.__torch_function__(func, types, args, kwargs)


def _forward_operators() -> None:
    for name in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "pow",
                 "rpow", "neg", "lt", "le", "gt", "ge", "eq", "ne", "abs"):
        dunder = f"__{name}__"

        def method(self: InputRef, *a: Any, _d: str = dunder) -> Any:
            return getattr(self.broadcast(), _d)(*a)

        setattr(InputRef, dunder, method)
    InputRef.__hash__ = object.__hash__  # type: ignore[method-assign]


_forward_operators()


def check_arity(fn: Any, what: str, counts: tuple[int, ...]) -> int:
    """The number of positional arguments to call `fn` with, from `counts`; else TraceError."""
    if not callable(fn):
        raise TraceError(f"{what}={fn!r} is not callable; pass a function")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return counts[0]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return counts[0]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in positional)
    for n in counts:
        if required <= n <= len(positional):
            return n
    want = " or ".join(str(n) for n in counts)
    raise TraceError(f"{what} {getattr(fn, '__qualname__', fn)} takes {len(positional)} "
                     f"positional arguments ({required} required); it must take {want}")


def trace_call(fn: Callable[..., Any], what: str, *args: Any) -> Any:
    """fn(*args) with symbolic arguments; any failure becomes a TraceError naming `what`."""
    token = _CURRENT.set(what)
    try:
        return fn(*args)
    except TraceError:
        raise
    except Exception as exc:  # the user's code may raise anything while being traced
        frames = traceback.extract_tb(exc.__traceback__)
        raise TraceError(f"{what} cannot be traced: {type(exc).__name__}: {exc} "
                         f"(at {user_line(frames)})") from exc
    finally:
        _CURRENT.reset(token)
