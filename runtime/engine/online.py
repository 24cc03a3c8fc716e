"""Tracing an OnlineFunc (online_fwd, online_fwd_epilogue, forward, backward) into an
OnlineProgram, and the built-in row reductions: online softmax (the default), sigmoid
attention (no normalisation) and retention-style normalisation.

Shapes: per query row; `scores` is the block [rows, keys], row scales are per row.
"""

from __future__ import annotations

from typing import Any

from attnrt.engine.errors import TraceError
from attnrt.engine.spec import (
    CustomIO,
    OnlineFunc,
    OnlineProgram,
    SymbolScalar,
    Var,
    floor_inf,
)
from attnrt.engine.trace import INT, Expr, as_expr, check_arity, leaf, trace_call, where

_METHODS = ("online_fwd", "online_fwd_epilogue", "forward", "backward")


def _rowscale_inits(rowscales: Any, what: str) -> tuple[tuple[str, float], ...]:
    if not isinstance(rowscales, dict):
        raise TraceError(f"{what} must be a dict of name -> SymbolScalar, got "
                         f"{type(rowscales).__name__}")
    inits = []
    for name, value in rowscales.items():
        if isinstance(value, Expr) and value.op == "const":
            inits.append((str(name), floor_inf(float(value.attr))))
        elif isinstance(value, int | float):
            inits.append((str(name), floor_inf(float(value))))
        else:
            raise TraceError(f"{what}[{name!r}] must be SymbolScalar(name, Var(initial value))")
    return tuple(inits)


def _check_methods(func: Any) -> str:
    name = type(func).__name__
    missing = [m for m in _METHODS if not callable(getattr(func, m, None))]
    if missing:
        raise TraceError(f"online_func {name} does not define {', '.join(missing)}; an "
                         f"OnlineFunc needs {', '.join(_METHODS)}")
    for method, n in zip(_METHODS, (5, 5, 6, 8), strict=True):
        check_arity(getattr(func, method), f"{name}.{method}", (n,))
    return name


def _row(value: Any, what: str) -> Expr:
    expr = as_expr(value)
    if expr.varies_along_kv:
        raise TraceError(f"{what} = {expr.text} varies along the keys; a row scale must be "
                         "per row (reduce the block with get_reduce)")
    return expr


def _rows_dict(value: Any, names: tuple[str, ...], what: str) -> tuple[tuple[str, Expr], ...]:
    if not isinstance(value, dict) or set(value) != set(names):
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise TraceError(f"{what} returned row scales {got}; declared: {sorted(names)}")
    return tuple((n, _row(value[n], f"{what}: row scale {n!r}")) for n in names)


def _trace_fwd(func: Any, name: str, rows: dict[str, Expr]) -> tuple:
    b, h, q = leaf("b", INT), leaf("h", INT), leaf("q_idx", INT)
    out = trace_call(func.online_fwd, f"{name}.online_fwd", leaf("score"), dict(rows), b, h, q)
    if not isinstance(out, tuple) or len(out) != 3:
        raise TraceError(f"{name}.online_fwd must return (scores, online_rowscales, o_scale)")
    p, new_rows, o_scale = out
    new = _rows_dict(new_rows, tuple(rows), f"{name}.online_fwd")
    return as_expr(p), new, _row(o_scale, f"{name}.online_fwd: o_scale")


def _trace_epilogue(func: Any, name: str, rows: dict[str, Expr],
                    finals: tuple[str, ...]) -> tuple:
    b, h, q = leaf("b", INT), leaf("h", INT), leaf("q_idx", INT)
    out = trace_call(func.online_fwd_epilogue, f"{name}.online_fwd_epilogue", leaf("o"),
                     dict(rows), b, h, q)
    if not isinstance(out, tuple) or len(out) != 2:
        raise TraceError(f"{name}.online_fwd_epilogue must return (o, final_rowscales)")
    o, final = out
    o = as_expr(o)
    if "o" not in o.leaves():
        raise TraceError(f"{name}.online_fwd_epilogue returned {o.text}, which does not read o")
    names = finals if finals else tuple(final) if isinstance(final, dict) else ()
    return o, _rows_dict(final, names, f"{name}.online_fwd_epilogue")


def trace_online(func: Any) -> OnlineProgram:
    """Trace `func` (None: online softmax) into an OnlineProgram; TraceError on misuse."""
    func = OnlineSoftmax() if func is None else func
    name = _check_methods(func)
    inits = _rowscale_inits(getattr(func, "online_rowscales", {}),
                            f"{name}.online_rowscales")
    declared = _rowscale_inits(getattr(func, "final_rowscales", {}), f"{name}.final_rowscales")
    rows = {n: leaf(f"row.{n}") for n, _ in inits}
    p, new_rows, o_scale = _trace_fwd(func, name, rows)
    out, finals = _trace_epilogue(func, name, rows, tuple(n for n, _ in declared))
    idx = (leaf("b", INT), leaf("h", INT), leaf("q_idx", INT), leaf("kv_idx", INT))
    final_leaves = {n: leaf(f"final.{n}") for n, _ in finals}
    recompute = as_expr(trace_call(func.forward, f"{name}.forward", leaf("score"),
                                   dict(final_leaves), *idx))
    dscore = as_expr(trace_call(func.backward, f"{name}.backward", leaf("dp"), leaf("p"),
                                dict(final_leaves), leaf("doosum"), *idx))
    return OnlineProgram(inits, p, new_rows, o_scale, out, finals, recompute, dscore)


class OnlineSoftmax(OnlineFunc):
    """Online softmax: m the running max, r the running sum of exp(s - m); lse = m + log r."""

    def __init__(self) -> None:
        super().__init__({"m": SymbolScalar("m", Var("-inf")), "r": SymbolScalar("r", Var("0"))},
                         {"lse": SymbolScalar("lse", Var("0"))}, CustomIO())

    @staticmethod
    def online_fwd(scores: Any, online_rowscales: dict, b: Any, h: Any, q_idx: Any) -> tuple:
        m, r = online_rowscales["m"], online_rowscales["r"]
        m_new = m.max(scores.get_reduce("max"))
        scale = (m - m_new).exp()
        p = (scores - m_new).exp()
        return p, {"m": m_new, "r": r * scale + p.get_reduce("sum")}, scale

    @staticmethod
    def online_fwd_epilogue(o: Any, online_rowscales: dict, b: Any, h: Any, q_idx: Any) -> tuple:
        r = online_rowscales["r"]
        return o / r, {"lse": r.log() + online_rowscales["m"]}

    @staticmethod
    def forward(scores: Any, final_rowscales: dict, b: Any, h: Any, q_idx: Any,
                kv_idx: Any) -> Any:
        return (scores - final_rowscales["lse"]).exp()

    @staticmethod
    def backward(dp: Any, scores: Any, final_rowscales: dict, doosum: Any, b: Any, h: Any,
                 q_idx: Any, kv_idx: Any) -> Any:
        return (dp - doosum) * scores


class OnlineIdentity(OnlineFunc):
    """No row normalisation (sigmoid attention: score_mod returns sigmoid(s + bias))."""

    def __init__(self) -> None:
        super().__init__({}, {}, CustomIO())

    @staticmethod
    def online_fwd(scores: Any, online_rowscales: dict, b: Any, h: Any, q_idx: Any) -> tuple:
        return scores, {}, SymbolScalar("o_scale", Var("1"))

    @staticmethod
    def online_fwd_epilogue(o: Any, online_rowscales: dict, b: Any, h: Any, q_idx: Any) -> tuple:
        return o, {}

    @staticmethod
    def forward(scores: Any, final_rowscales: dict, b: Any, h: Any, q_idx: Any,
                kv_idx: Any) -> Any:
        return scores

    @staticmethod
    def backward(dp: Any, scores: Any, final_rowscales: dict, doosum: Any, b: Any, h: Any,
                 q_idx: Any, kv_idx: Any) -> Any:
        return dp


class OnlineRetention(OnlineFunc):
    """Retention normalisation: p = s / r with r = max(sum_k |s_k|, 1) over the row's keys.

    The backward is exact (r depends on s): ds = (dp - [r > 1] * sign(s) * doosum) / r.
    """

    def __init__(self) -> None:
        super().__init__({"r_wo_clamp": SymbolScalar("r_wo_clamp", Var("0")),
                          "r": SymbolScalar("r", Var("1"))},
                         {"r": SymbolScalar("r", Var("1"))}, CustomIO())

    @staticmethod
    def online_fwd(scores: Any, online_rowscales: dict, b: Any, h: Any, q_idx: Any) -> tuple:
        total = online_rowscales["r_wo_clamp"] + scores.get_reduce("abssum")
        r_new = total.max(1.0)
        return scores / r_new, {"r_wo_clamp": total, "r": r_new}, online_rowscales["r"] / r_new

    @staticmethod
    def online_fwd_epilogue(o: Any, online_rowscales: dict, b: Any, h: Any, q_idx: Any) -> tuple:
        return o, {"r": online_rowscales["r"]}

    @staticmethod
    def forward(scores: Any, final_rowscales: dict, b: Any, h: Any, q_idx: Any,
                kv_idx: Any) -> Any:
        return scores / final_rowscales["r"]

    @staticmethod
    def backward(dp: Any, scores: Any, final_rowscales: dict, doosum: Any, b: Any, h: Any,
                 q_idx: Any, kv_idx: Any) -> Any:
        r = final_rowscales["r"]
        return (dp - where(r > 1.0, doosum, 0.0) * scores.sign()) / r
