"""AttentionEngine's user-facing pieces (CustomIO, OnlineFunc, SymbolScalar, Var, meta_tensor)
and `trace_variant`, which traces a score_mod, mask_mod and OnlineFunc into one `Variant`.

Shapes: B batch, N query sequence, M key sequence, H heads, D head size, Dv value head size.

Meaning of a variant, per query row (q_idx) of head h in batch b, over the keys kv_idx:
    s      = q . k                                 (raw, or q . k * softmax_scale if one is set)
    s      = score_mod(s, custom_fwd_inputs, b, h, q_idx, kv_idx)
    keep   = mask_mod(b, h, q_idx, kv_idx)         (True: the key takes part)
    p, rowscales, o_scale = online_fwd(s, rowscales, b, h, q_idx)   per block of keys
    o      = o * o_scale + p @ v
    o, final_rowscales = online_fwd_epilogue(o, rowscales, b, h, q_idx)
Masked keys take no part: their p is 0 and row reductions (get_reduce) skip them. A row that
keeps no key at all outputs 0. Row scales declared Var("-inf") start at -1e30 (so that
exp(m - m_new) stays finite before a row has seen a key).
The backward recomputes p = forward(s, final_rowscales, ...) and takes
ds = backward(dp, p, final_rowscales, doosum, ...) with dp = do @ v^T and doosum = rowsum(do * o),
then differentiates score_mod symbolically for dq, dk and the custom inputs' gradients.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from attnrt.engine.errors import TraceError
from attnrt.engine.trace import (
    BOOL,
    FLOAT,
    INT,
    Expr,
    InputRef,
    as_expr,
    check_arity,
    const,
    leaf,
    trace_call,
)

NEG_FLOOR = -1e30  # stands for -inf in row scales (see the module docstring)


class Var:
    """A row scale's initial value, written as AttentionEngine writes it: Var("-inf")."""

    def __init__(self, value: str | float) -> None:
        try:
            self.value = float(value)
        except ValueError:
            raise TraceError(f"Var({value!r}) is not a number; allowed: a float or its text "
                             "such as '-inf' or '0.0'") from None


class SymbolScalar(Expr):
    """A named per-row scalar with a constant value, SymbolScalar("m", Var("-inf"))."""

    def __init__(self, varname: str, value: Var | float) -> None:
        number = value.value if isinstance(value, Var) else float(value)
        super().__init__("const", attr=number, kind=FLOAT)
        self.varname = varname


class CustomIO:
    """Custom inputs a variant reads, by name and declared shape, in call order.

    CustomIO({"alibi_slopes": ("heads",), "bias": (31,)}): dims are sizes or the names
    "batch", "heads", "seq_len", "seq_len_kv" (bound to B, H, N, M at the call).
    """

    def __init__(self, input_tensors: dict[str, tuple] | None = None) -> None:
        specs = dict(input_tensors or {})
        for name, shape in specs.items():
            _check_spec(name, shape)
        self.specs = {name: tuple(shape) for name, shape in specs.items()}
        self.input_tensors = _Inputs({n: InputRef(n, s) for n, s in self.specs.items()})

    def __getitem__(self, name: str) -> Any:
        return self.input_tensors[name]

    def __len__(self) -> int:
        return len(self.specs)


class _Inputs(dict):
    def __missing__(self, name: str) -> Any:
        raise TraceError(f"custom input {name!r} is read but not declared in "
                         f"custom_fwd_inputs; declared: {', '.join(self) or 'none'}")


_DIM_NAMES = ("batch", "heads", "seq_len", "seq_len_kv")


def _check_spec(name: Any, shape: Any) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise TraceError(f"custom input name {name!r} must be an identifier")
    ok = isinstance(shape, tuple | list) and len(shape) > 0 and all(
        (isinstance(d, int) and not isinstance(d, bool) and d > 0) or d in _DIM_NAMES
        for d in shape)
    if not ok:
        raise TraceError(f"custom input {name!r} has shape {shape!r}; allowed: a non-empty "
                         f"tuple of positive sizes or the names {', '.join(_DIM_NAMES)}")


class meta_tensor:  # noqa: N801 - AttentionEngine's name
    """Shape and dtype of q, k or v, in AttentionEngine's order: meta_tensor(B, H, N, D, dtype)."""

    def __init__(self, *shape: int, dtype: torch.dtype = torch.float16) -> None:
        if len(shape) != 4 or any(not isinstance(s, int) or s < 1 for s in shape):
            raise TraceError(f"meta_tensor{shape} must have 4 positive sizes (B, H, N, D)")
        self.shape, self.dtype = tuple(shape), dtype


class OnlineFunc:
    """A row reduction: subclasses define online_fwd, online_fwd_epilogue, forward and backward
    (static methods, AttentionEngine's signatures) and declare their row scales here."""

    def __init__(self, online_rowscales: dict[str, Any] | None = None,
                 final_rowscales: dict[str, Any] | None = None,
                 external_fwd_tensors: CustomIO | None = None) -> None:
        self.online_rowscales = dict(online_rowscales or {})
        self.final_rowscales = dict(final_rowscales or {})
        self.external_fwd_tensors = external_fwd_tensors or CustomIO()


@dataclass(frozen=True)
class OnlineProgram:
    """An OnlineFunc traced: initial row scales, the per-block update, epilogue, and the
    backward's recompute and score gradient."""

    inits: tuple[tuple[str, float], ...]
    p: Expr
    rows: tuple[tuple[str, Expr], ...]
    o_scale: Expr
    out: Expr
    finals: tuple[tuple[str, Expr], ...]
    recompute: Expr
    dscore: Expr


@dataclass(frozen=True)
class Variant:
    """One traced attention variant; `key` is a digest of its canonical text."""

    score: Expr
    mask: Expr | None
    online: OnlineProgram
    inputs: tuple[tuple[str, tuple], ...]
    mask_uses_inputs: bool
    text: str
    key: str

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.inputs)


def index_leaves() -> tuple[Expr, Expr, Expr, Expr]:
    return leaf("b", INT), leaf("h", INT), leaf("q_idx", INT), leaf("kv_idx", INT)


def trace_score_mod(score_mod: Any, custom: CustomIO) -> Expr:
    score = leaf("score")
    if score_mod is None:
        return score
    check_arity(score_mod, "score_mod", (6,))
    out = trace_call(score_mod, "score_mod", score, custom, *index_leaves())
    return _result(out, "score_mod", FLOAT)


def trace_mask_mod(mask_mod: Any, custom: CustomIO) -> Expr | None:
    if mask_mod is None:
        return None
    n = check_arity(mask_mod, "mask_mod", (4, 5))
    extra = (custom,) if n == 5 else ()
    out = trace_call(mask_mod, "mask_mod", *index_leaves(), *extra)
    result = _result(out, "mask_mod", BOOL)
    if result.varies_along_kv and "score" in result.leaves():
        raise TraceError("mask_mod reads the score; masks depend on b, h, q_idx, kv_idx only")
    return result


def _result(out: Any, what: str, kind: str) -> Expr:
    if isinstance(out, InputRef):
        out = out.broadcast()
    if isinstance(out, bool) or (kind == FLOAT and isinstance(out, int | float)):
        return const(out if kind == BOOL else float(out))
    if not isinstance(out, Expr):
        raise TraceError(f"{what} returned {type(out).__name__}; it must return one "
                         f"{'boolean' if kind == BOOL else 'score'} value computed from its "
                         "arguments")
    if kind == BOOL and out.kind != BOOL:
        raise TraceError(f"{what} returned a {out.kind} value {out.text}; it must return a "
                         "boolean (True: the key takes part)")
    if kind == FLOAT and out.kind == BOOL:
        raise TraceError(f"{what} returned a boolean {out.text}; it must return a score (use "
                         "mask_mod for masks)")
    if kind == FLOAT and out.kind == INT:
        return Expr("add", (out, const(0.0)), kind=FLOAT)
    return out


def variant_text(score: Expr, mask: Expr | None, online: OnlineProgram,
                 inputs: tuple) -> str:
    parts = [f"score={score.text}", f"mask={mask.text if mask is not None else 'None'}",
             f"inits={online.inits}", f"p={online.p.text}", f"o_scale={online.o_scale.text}",
             f"out={online.out.text}", f"recompute={online.recompute.text}",
             f"dscore={online.dscore.text}", f"inputs={inputs}"]
    parts += [f"row.{n}={e.text}" for n, e in online.rows]
    parts += [f"final.{n}={e.text}" for n, e in online.finals]
    return "\n".join(parts)


def trace_variant(score_mod: Any, mask_mod: Any, online_func: Any,
                  custom: CustomIO | None) -> Variant:
    """Trace the user's functions once; raises TraceError naming the function and line."""
    from attnrt.engine.online import trace_online

    if custom is not None and not isinstance(custom, CustomIO):
        raise TraceError(f"custom_fwd_inputs={custom!r} must be a CustomIO")
    custom = custom or CustomIO()
    score = trace_score_mod(score_mod, custom)
    mask = trace_mask_mod(mask_mod, custom)
    online = trace_online(online_func)
    inputs = tuple(custom.specs.items())
    text = variant_text(score, mask, online, inputs)
    mask_inputs = mask is not None and any(x.startswith("in.") for x in mask.leaves())
    return Variant(score, mask, online, inputs, mask_inputs, text,
                   hashlib.sha256(text.encode()).hexdigest()[:24])


def floor_inf(value: float) -> float:
    """Row-scale initial values: -inf becomes NEG_FLOOR, +inf -NEG_FLOOR."""
    if math.isinf(value):
        return NEG_FLOOR if value < 0 else -NEG_FLOOR
    return value


__all__ = ["INT", "CustomIO", "OnlineFunc", "SymbolScalar", "Var", "Variant", "as_expr",
           "meta_tensor", "trace_variant"]
