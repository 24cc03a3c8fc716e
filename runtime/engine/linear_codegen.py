"""Fusing LinearAttentionEngine's element-wise q/k/v mods into the chunked Triton kernels.

Shapes: B batch, N sequence, H heads, D head size; a mod maps q, k or v [B, N, H, D] to a tensor
of the same shape.

Each q/k/v mod is traced once, at construction, by the softmax engine's tracer (engine.trace)
with one symbolic element `x` (its `.shape` gives H and D; B and N vary per call and are not
traceable). What comes back is an expression of x alone; engine.emit prints it as a Triton
function `mod(x)` and its symbolic derivative as `grad(x)`, both of a float32 tile, loaded
through the softmax engine's on-disk module cache (engine.kernel.load_module). The chunked
kernels take them as constexpr function arguments (kernels.linear.chunked.KernelMods): every
kernel that loads q, k or v applies the mod right after the load; the backward kernels multiply
dq, dk, dv by grad(raw input) before storing them.

A mod that cannot be fused runs in the PyTorch pre-pass instead, and its plan says why:
- it reads a custom input (custom_io): custom tensors are broadcast and differentiated by
  autograd in the pre-pass;
- it is not element-wise or not traceable: a softmax over the head dim (SLA's feature map),
  data-dependent control flow, indexing, an unsupported torch function;
- it returns a non-float value, or its expression disagrees with the mod itself on a float64
  probe (value or derivative), e.g. a torch argument the tracer does not model.
Both paths compute the same function: the probe compares them before a plan says "kernel".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attnrt.engine.emit import Emitter, diff
from attnrt.engine.errors import TraceError
from attnrt.engine.trace import FLOAT, Expr, trace_call

KERNEL, PRE_PASS = "kernel", "pre-pass"
_FIXED_DIMS = (2, 3, -1, -2)  # H and D: fixed by qkv_meta, so a traced mod may read them


@dataclass(frozen=True)
class ModPlan:
    """Where one mod runs (KERNEL or PRE_PASS) and why; expr and grad are the traced mod and
    its derivative (for KERNEL)."""

    path: str
    reason: str
    expr: Expr | None = None
    grad: Expr | None = None


class _Shape(tuple):
    """A traced tensor's shape: H and D are known; B and N vary per call, so reading them
    cannot be traced."""

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, int) or index not in _FIXED_DIMS:
            raise TraceError(f"reads shape[{index!r}]; only the head count and size "
                             "(shape[2], shape[3], shape[-1], shape[-2]) are fixed")
        return tuple.__getitem__(self, index)

    def __iter__(self) -> Any:
        raise TraceError("unpacks the shape; only shape[2] / shape[-1] style reads trace")


class _Element(Expr):
    """The symbolic element x a mod is traced with: an Expr leaf that also has a shape."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__("leaf", attr="x", kind=FLOAT)
        self.shape = _Shape(shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]


class _CustomInputRead(TraceError):
    pass


class _Inputs(dict):
    """custom_io.input_tensors while tracing: any read is refused (the pre-pass serves it)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        name = args[0] if args else "?"
        raise _CustomInputRead(f"reads custom input {name!r}")

    __getitem__ = get = pop = __contains__ = _refuse

    def __iter__(self) -> Any:
        raise _CustomInputRead("looks at the custom inputs")

    values = items = keys = __len__ = __bool__ = __iter__


class _TracingIO:
    def __init__(self) -> None:
        self.input_tensors = _Inputs()


def plan_mod(name: str, fn: Callable[..., Any], shape: tuple[int, ...]) -> ModPlan:
    """KERNEL with the traced expression and derivative, or PRE_PASS with the reason."""
    try:
        out = trace_call(fn, name, _Element(shape), _TracingIO())
    except _CustomInputRead as exc:
        return ModPlan(PRE_PASS, f"{exc} (custom inputs are read in the pre-pass, where "
                                 "autograd differentiates them)")
    except TraceError as exc:
        return ModPlan(PRE_PASS, f"not traceable as an element-wise function: {_one_line(exc)}")
    if not isinstance(out, Expr) or out.kind != FLOAT:
        what = out.kind if isinstance(out, Expr) else type(out).__name__
        return ModPlan(PRE_PASS, f"returns a {what} value, not a float element-wise function")
    try:
        grad = diff(out, "x")
    except TraceError as exc:
        return ModPlan(PRE_PASS, f"its derivative cannot be formed: {exc}")
    mismatch = _probe(fn, out, grad, shape)
    if mismatch:
        return ModPlan(PRE_PASS, mismatch)
    return ModPlan(KERNEL, "element-wise: fused into the Triton kernels, applied after each "
                           "load, its derivative before each gradient store", out, grad)


def _one_line(exc: Exception) -> str:
    """The first line of a trace error, with its '(at file:line: code)' if it had more."""
    lines = str(exc).splitlines()
    where = lines[-1][lines[-1].rfind("(at "):] if len(lines) > 1 and "(at " in lines[-1] else ""
    return f"{lines[0].rstrip(':')} {where}".strip()


def _probe(fn: Callable[..., Any], expr: Expr, grad: Expr, shape: tuple[int, ...]) -> str:
    """'' when the expression and its derivative equal the mod and autograd's derivative on a
    float64 probe; else what differs."""
    from attnrt.engine.evaluate import TorchEval

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn((1, 3, *shape[2:]), generator=gen, dtype=torch.float64) * 2)
    x.requires_grad_()
    try:
        want = fn(x, _TracingIO())
    except Exception as exc:  # the user's mod may raise anything on a float64 CPU probe
        return f"the mod failed on a float64 probe: {type(exc).__name__}: {exc}"
    if not isinstance(want, torch.Tensor) or want.shape != x.shape:
        return "the mod does not return a tensor of its input's shape on a probe"
    (want_grad,) = torch.autograd.grad(want.sum(), x, allow_unused=True) if want.requires_grad \
        else (None,)
    want_grad = torch.zeros_like(x) if want_grad is None else want_grad
    x = x.detach()
    evaluate = TorchEval({"x": x, "kv_idx": x}, {}, torch.float64)  # kv_idx: the device
    for what, got, ref in (("value", evaluate(expr), want), ("derivative", evaluate(grad),
                                                             want_grad)):
        got = torch.broadcast_to(torch.as_tensor(got, dtype=torch.float64), x.shape)
        if not torch.allclose(got, ref.detach().double(), rtol=1e-9, atol=1e-12,
                              equal_nan=True):
            return (f"its traced {what} differs from the mod's on a float64 probe (an argument "
                    f"the tracer does not model?)")
    return ""


def mod_source(expr: Expr, grad: Expr) -> str:
    """A Triton module with `mod(x)` and `grad(x)` (float32 tiles in, float32 tiles out)."""
    parts = ["import triton\nimport triton.language as tl\n"]
    for fname, e in (("mod", expr), ("grad", grad)):
        em = Emitter({"x": "x"}, {}, None, "t")
        value = em(e, as_float=True)
        if e.op == "const":  # a constant still has the tile's shape
            value = f"{value} + tl.zeros_like(x)"
        body = "\n".join(f"    {line}" for line in em.lines)
        parts.append(f"\n@triton.jit\ndef {fname}(x):\n{body + chr(10) if body else ''}"
                     f"    return {value}\n")
    return "\n".join(parts)


def kernel_mods(plans: dict[str, ModPlan]) -> Any:
    """The kernels' KernelMods for the plans whose path is KERNEL (imports Triton)."""
    from attnrt.engine.kernel import load_module
    from attnrt.kernels.linear.chunked import KernelMods

    fns: dict[str, Any] = {}
    for name in ("q_mod", "k_mod", "v_mod"):
        plan = plans.get(name)
        if plan is None or plan.path != KERNEL:
            continue
        module = load_module(mod_source(plan.expr, plan.grad))  # type: ignore[arg-type]
        letter = name[0].upper()
        fns[f"{letter}_MOD"], fns[f"{letter}_GRAD"] = module.mod, module.grad
    return KernelMods(**fns)
