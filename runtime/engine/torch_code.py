"""Printing a traced expression as a plain torch function, for FlexAttention: straight-line
torch calls that Dynamo compiles without graph breaks (no evaluator objects in the way).

The function reads the call's tensors from a state dict bound at creation (`S["in"][name]`
for custom inputs, `S["docq"]`, `S["posq"]`, `S["dock"]`, `S["posk"]` for variable-length
layouts, `S["blocks"]` and `S["bq"]`, `S["bk"]` for block-sparse masks); the caller refills
the dict before each call, so the function object, and FlexAttention's compiled code, stay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attnrt.engine.emit import literal
from attnrt.engine.trace import FLOAT, Expr

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "lt": "<", "le": "<=", "eq": "==",
          "ne": "!=", "and": "&", "or": "|", "xor": "^"}
_CALL = {"exp": "torch.exp", "exp2": "torch.exp2", "log": "torch.log", "log2": "torch.log2",
         "tanh": "torch.tanh", "sigmoid": "torch.sigmoid", "abs": "torch.abs",
         "sqrt": "torch.sqrt", "sign": "torch.sign", "neg": "torch.neg", "pow": "torch.pow"}


class _Printer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.memo: dict[str, str] = {}

    def __call__(self, e: Expr) -> str:
        if e.op == "const":
            return literal(e.attr, e.kind)
        if e.op == "leaf":
            return str(e.attr)
        if e.text not in self.memo:
            code = self._code(e)  # first: it may add the arguments' own lines
            var = f"t{len(self.memo)}"
            self.lines.append(f"    {var} = {code}")
            self.memo[e.text] = var
        return self.memo[e.text]

    def _code(self, e: Expr) -> str:
        a = [self(x) for x in e.args]
        if e.op == "input":
            return f"S['in'][{e.attr!r}][{', '.join(a) or '()'}].float()"
        if e.op in _INFIX:
            return f"({a[0]} {_INFIX[e.op]} {a[1]})"
        if e.op in _CALL:
            return f"{_CALL[e.op]}({', '.join(a)})"
        if e.op in ("max", "min"):
            return self._extreme(e, a)
        return {
            "floordiv": lambda: f"torch.div({a[0]}, {a[1]}, rounding_mode='floor')",
            "mod": lambda: f"torch.remainder({a[0]}, {a[1]})",
            "not": lambda: f"(~{a[0]})",
            "where": lambda: f"torch.where({a[0]}, {a[1]}, {a[2]})",
        }[e.op]()

    def _extreme(self, e: Expr, a: list[str]) -> str:
        bound = "min" if e.op == "max" else "max"
        consts = [i for i, x in enumerate(e.args) if x.op == "const"]
        if consts:
            other = 1 - consts[0]
            value = literal(e.args[consts[0]].attr, FLOAT if e.kind == FLOAT else e.kind)
            return f"torch.clamp({a[other]}, {bound}={value})"
        return f"torch.{'maximum' if e.op == 'max' else 'minimum'}({a[0]}, {a[1]})"


_REMAP = ("    b = S['docq'][q_idx]", "    kv_doc = S['dock'][kv_idx]",
          "    q_idx, kv_idx = S['posq'][q_idx], S['posk'][kv_idx]")


def torch_function(expr: Expr | None, kind: str, varlen: bool, blocks: bool,
                   state: dict[str, Any]) -> Callable[..., Any]:
    """score_mod(score, b, h, q_idx, kv_idx) (kind "score") or mask_mod(b, h, q_idx, kv_idx)
    (kind "mask", combined with the layout's own masks) reading `state`."""
    printer = _Printer()
    args = "score, b, h, q_idx, kv_idx" if kind == "score" else "b, h, q_idx, kv_idx"
    head = [f"def fn({args}):"]
    if blocks and kind == "mask":
        head.append("    kept = S['blocks'][b, h, q_idx // S['bq'], kv_idx // S['bk']]")
    if varlen:
        head += list(_REMAP)
    result = printer(expr) if expr is not None else ("True" if kind == "mask" else "score")
    terms = [result] if expr is not None or kind == "score" else []
    if kind == "mask":
        terms += (["(b == kv_doc)"] if varlen else []) + (["kept"] if blocks else [])
        result = " & ".join(terms) or "True"
        result = {"True": "(q_idx >= 0)", "False": "(q_idx < 0)"}.get(result, result)
    body = head + printer.lines + [f"    return {result}"]
    namespace: dict[str, Any] = {"S": state, "torch": __import__("torch")}
    exec(compile("\n".join(body), f"<attnrt engine {kind}_mod>", "exec"), namespace)  # noqa: S102
    return namespace["fn"]
