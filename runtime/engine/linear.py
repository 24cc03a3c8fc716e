"""LinearAttentionEngine: user-defined linear attention (AttentionEngine's API, attnrt's layout).

Shapes: B batch, N sequence, H heads, Dk query/key head size, Dv value head size.
q, k [B, N, H, Dk]; v [B, N, H, Dv]; decay [H], [B, N, H] or [B, N, H, Dk]; states [B, H, Dk, Dv]
float32 (float64 for float64 inputs). AttentionEngine writes [B, H, N, D]; attnrt keeps
[B, N, H, D] throughout, like flash-linear-attention.

    mod = LinearAttentionEngine(qkv_meta, q_mod=None, k_mod=None, v_mod=None, decay_mod=None,
                                custom_io=None)
    out = mod(q, k, v, decay, custom_io=None)          # out.backward(do): dq, dk, dv, ddecay...

Meaning (causal): with q' = q_mod(q, io), k' = k_mod(k, io), v' = v_mod(v, io) and
g = decay_mod(decay, io) (identity when a mod is None),

    S_t = diag(exp(g_t)) S_{t-1} + k'_t^T v'_t,    out_t = q'_t S_t,

so, as in AttentionEngine, what decay_mod returns is a natural-log decay g <= 0 (the factor
exp(g) is in (0, 1]): pass decay_mod=lambda d, io: d.log() for RetNet-style factors, or log-decays
(e.g. logsigmoid gates) with no decay_mod. decay=None: no decay. A [H] decay is one constant per
head (RetNet); [B, N, H] one per head and token (Mamba-2, simple GLA); [B, N, H, Dk] one per key
channel (GLA). Mods are element-wise (any shape-keeping torch function, e.g. elu+1, relu, or a
softmax over the head dim as SLA's feature map); their outputs are cast to q's dtype. Scaling
(1/sqrt(Dk)) is the user's, in q_mod. No normalizer is applied.

Extensions, keyword-only:
- constructor: `causal=False` (out_t = q'_t (S_0 + sum_s k'_s^T v'_s), no decay allowed; two
  matrix products in PyTorch whichever backend is named); `backend=` ("triton", "fla",
  "reference"; None: Triton on CUDA, the reference elsewhere); `fuse_mods=` where the q/k/v
  mods run (below).
- call: `initial_state=`, `output_final_state=True` (the call then returns (out,
  final_state)), so long sequences run in pieces; `step(...)` decodes one token.

Where the mods run (`fuse_mods`; `engine.mod_paths` and `engine.explain()` say per mod):
- "kernel" (default): on the Triton backend, each element-wise q/k/v mod is traced once at
  construction (the softmax engine's tracer) and fused into the chunked kernels, forward and
  backward: applied in float32 right after each load of q, k or v and cast to q's dtype (as the
  pre-pass casts), its derivative applied to dq, dk, dv before they are stored; no modded copy
  of q, k, v (or of their gradients) is written. A mod that is not element-wise or not
  traceable (SLA's softmax over the head dim, data-dependent control flow, reading a custom
  input) runs in the eager pre-pass, and mod_paths gives the reason. The reference and fla
  backends, causal=False, and step() run every mod in the pre-pass.
- "compile": every mod in one torch.compile'd pre-pass (Inductor fuses them with the casts
  into a few kernels, forward and backward) -- what fuse_mods=True used to mean.
- "eager": every mod in an eager PyTorch pre-pass -- what fuse_mods=False used to mean.
Booleans are refused with the value to write now. decay_mod always runs in the pre-pass: the
log-decay is summed within chunks on the host before the kernels run, so a fused decay_mod
would save nothing. Both paths compute the same function (engine.linear_codegen probes each
traced mod against the mod itself before fusing it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from attnrt.engine import linear_checks as checks
from attnrt.engine.linear_codegen import KERNEL, PRE_PASS, ModPlan, plan_mod
from attnrt.errors import BackendUnavailableError
from attnrt.kernels.linear.errors import LinearAttentionError, ModShapeError
from attnrt.kernels.linear.reference import accumulation_dtype, linear_attention_step

Mod = Callable[[torch.Tensor, "CustomIO"], torch.Tensor]
MOD_NAMES = ("q_mod", "k_mod", "v_mod", "decay_mod")
DECAY_REASON = ("decay_mod always runs in the pre-pass: the log-decay is summed within chunks "
                "on the host before the kernels run")


class CustomIO:
    """Custom inputs the mods read: declared as {name: shape}; a mod reads the tensor given at
    call time as `custom_io.input_tensors[name]` (as in AttentionEngine)."""

    def __init__(self, input_tensors: dict[str, Sequence[int]] | None = None) -> None:
        self.input_tensors: dict[str, Any] = dict(input_tensors or {})

    @property
    def names(self) -> list[str]:
        return list(self.input_tensors)

    def bound(self, tensors: dict[str, torch.Tensor]) -> CustomIO:
        """A CustomIO whose input_tensors holds `tensors` (same names)."""
        io = CustomIO()
        io.input_tensors = dict(tensors)
        return io


def meta_tensor(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A shape-and-dtype-only tensor for qkv_meta: meta_tensor(B, N, H, D, dtype=...)."""
    return torch.empty(shape, dtype=dtype, device="meta")


class LinearAttentionEngine:
    """Linear attention defined by element-wise mods (see the module docstring).

    q, k [B, N, H, Dk], v [B, N, H, Dv], decay None | [H] | [B, N, H] | [B, N, H, Dk]
    -> out [B, N, H, Dv] (and the final state [B, H, Dk, Dv] with output_final_state=True).
    """

    def __init__(self, qkv_meta: Sequence[Any], q_mod: Mod | None = None,
                 k_mod: Mod | None = None, v_mod: Mod | None = None,
                 decay_mod: Mod | None = None, custom_io: CustomIO | None = None, *,
                 causal: bool = True, backend: str | None = None,
                 fuse_mods: str = "kernel") -> None:
        q_shape, _, v_shape = checks.check_meta(qkv_meta)
        self.heads, self.dk, self.dv = q_shape[2], q_shape[3], v_shape[3]
        self.dtype = qkv_meta[0].dtype
        self.mods = {"q_mod": q_mod, "k_mod": k_mod, "v_mod": v_mod, "decay_mod": decay_mod}
        for name, fn in self.mods.items():
            if fn is not None and not callable(fn):
                raise checks.LinearAttentionTypeError(
                    f"{name}={fn!r} is not allowed; allowed: a callable (tensor, custom_io) "
                    f"-> tensor, or None")
        if custom_io is not None and not isinstance(custom_io, CustomIO):
            raise checks.LinearAttentionTypeError(
                f"custom_io={custom_io!r} is not allowed; allowed: CustomIO({{name: shape}})")
        self.custom_io = custom_io or CustomIO()
        if backend is not None and backend not in ("triton", "fla", "reference"):
            raise LinearAttentionError(f"backend={backend!r} is not allowed; allowed: None, "
                                       f"'triton', 'fla', 'reference'")
        self.causal, self.backend = bool(causal), backend
        self.fuse_mods = checks.check_fuse_mods(fuse_mods)
        self._compiled: Callable[..., Any] | None = None
        self._kernel_mods: Any = None
        self._trace(qkv_meta)
        self.mod_paths: dict[str, ModPlan] = self._plan(qkv_meta)
        self.last_fused: tuple[str, ...] = ()  # the mods the last call ran inside the kernels

    def _plan(self, qkv_meta: Sequence[Any]) -> dict[str, ModPlan]:
        """Where each given mod runs on the Triton backend, and why (see the module doc)."""
        plans = {}
        for name, meta in zip(("q_mod", "k_mod", "v_mod"), qkv_meta, strict=True):
            fn = self.mods[name]
            if fn is None:
                continue
            if self.fuse_mods != "kernel":
                plans[name] = ModPlan(PRE_PASS, f"fuse_mods={self.fuse_mods!r}")
            elif self.backend in ("fla", "reference"):
                plans[name] = ModPlan(PRE_PASS, f"backend={self.backend!r}: only the Triton "
                                                "kernels fuse mods")
            elif not self.causal:
                plans[name] = ModPlan(PRE_PASS, "causal=False: two matrix products in PyTorch")
            else:
                plans[name] = plan_mod(name, fn, tuple(int(d) for d in meta.shape))
        if self.mods["decay_mod"] is not None:
            plans["decay_mod"] = ModPlan(PRE_PASS, DECAY_REASON)
        return plans

    def explain(self) -> str:
        """One line per given mod: where it runs on the Triton backend, and why."""
        lines = [f"{name}: {plan.path} ({plan.reason})" for name, plan in self.mod_paths.items()]
        lines.append("(the reference and fla backends and step() run every mod in the pre-pass)")
        return "\n".join(lines)

    def _trace(self, qkv_meta: Sequence[Any]) -> None:
        """Run q/k/v mods on meta tensors of qkv_meta's shapes: a mod that changes shapes is
        refused here, before any data exists (decay_mod is checked per call: decay's shape
        is only known then)."""
        io = self.custom_io.bound({name: torch.empty(tuple(shape), device="meta")
                                   for name, shape in self.custom_io.input_tensors.items()})
        for name, meta in zip(("q_mod", "k_mod", "v_mod"), qkv_meta, strict=True):
            fn = self.mods[name]
            if fn is None:
                continue
            probe = torch.empty(tuple(meta.shape), dtype=meta.dtype, device="meta")
            try:
                out = fn(probe, io)
            except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as exc:
                raise ModShapeError(f"{name} failed on a meta tensor of shape "
                                    f"{tuple(meta.shape)}: {exc}") from exc
            checks.check_mod_output(name, probe, out)

    # -- calls ---------------------------------------------------------------------------------

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 decay: torch.Tensor | None = None, custom_io: Any = None, *,
                 initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                 ) -> Any:
        checks.check_qkv(q, k, v, self.heads, self.dk, self.dv, self.dtype)
        name, run = self._runner(q)  # a forced backend that cannot run here raises
        fused = tuple(n for n, plan in self.mod_paths.items()
                      if plan.path == KERNEL and name == "triton")
        qm, km, vm, g, h0 = self._prepare(q, k, v, decay, custom_io, initial_state, fused)
        self.last_fused = fused
        if not self.causal:
            o, ht = _non_causal(qm, km, vm, h0, q.dtype)
        elif fused:
            o, ht = run(qm, km, vm, g, h0, output_final_state, mods=self._fused_mods())
        else:
            o, ht = run(qm, km, vm, g, h0, output_final_state)
        return (o, ht) if output_final_state else o

    def _fused_mods(self) -> Any:
        """The KernelMods of the fused mods, built (Triton imported) on first use."""
        if self._kernel_mods is None:
            from attnrt.engine.linear_codegen import kernel_mods

            self._kernel_mods = kernel_mods(self.mod_paths)
        return self._kernel_mods

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             decay: torch.Tensor | None, state: torch.Tensor, custom_io: Any = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step with the same mods: q, k [B, 1, H, Dk], v [B, 1, H, Dv], state
        [B, H, Dk, Dv] -> (out [B, 1, H, Dv], new state). Equals calling the engine on the
        token with initial_state=state, output_final_state=True."""
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[1] != 1:
            what = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise LinearAttentionError(f"q shape={what} is not allowed in step; allowed: "
                                       f"[B, 1, H, Dk] (one token)")
        if state is None:
            raise LinearAttentionError("state=None is not allowed in step; allowed: a "
                                       "[B, H, Dk, Dv] tensor (zeros to start)")
        if not self.causal:
            raise LinearAttentionError("step on a causal=False engine is not allowed; allowed: "
                                       "causal=True (decoding is causal)")
        qm, km, vm, g, h0 = self._prepare(q, k, v, decay, custom_io, state)
        o, new_state = linear_attention_step(qm[:, 0], km[:, 0], vm[:, 0],
                                             None if g is None else g[:, 0], h0)
        return o.unsqueeze(1), new_state

    # -- helpers -------------------------------------------------------------------------------

    def _prepare(self, q, k, v, decay, custom_io, initial_state,  # type: ignore[no-untyped-def]
                 fused=()):
        """Checks, then the pre-pass of every mod not in `fused` (those run in the kernels:
        their tensors pass through raw)."""
        checks.check_qkv(q, k, v, self.heads, self.dk, self.dv, self.dtype)
        checks.check_decay(decay, q)
        checks.check_state(initial_state, q, self.dv, "initial_state")
        if decay is not None and not self.causal:
            raise LinearAttentionError(
                "decay given to a causal=False engine is not allowed; allowed: decay=None "
                "(non-causal linear attention has no token order to decay over)")
        tensors = checks.check_custom_inputs(self.custom_io.names, custom_io, q.device)
        modded = self._mod_pass()(q, k, v, decay, self.custom_io.bound(tensors), fused)
        for name, before, after in zip(MOD_NAMES, (q, k, v, decay), modded, strict=True):
            if self.mods[name] is not None and before is not None and name not in fused:
                checks.check_mod_output(name, before, after)
        qm, km, vm, g = modded
        if g is not None:
            checks.check_log_decay(g, self.mods["decay_mod"] is not None)
            if g.dim() == 1:  # one constant per head (RetNet)
                g = g.expand(q.shape[0], q.shape[1], -1)
        return qm, km, vm, g, initial_state

    def _mods(self, q, k, v, decay, io, fused=()):  # type: ignore[no-untyped-def]
        """The pre-pass: every mod not in `fused`, then q/k/v cast to q's dtype and the
        log-decay to float32 (float64 for float64 inputs). Under fuse_mods="compile",
        torch.compile fuses it into a few kernels (forward and backward)."""
        acc = accumulation_dtype(q.dtype)
        out = []
        for name, t in zip(MOD_NAMES, (q, k, v, decay), strict=True):
            fn = self.mods[name]
            t = t if fn is None or t is None or name in fused else fn(t, io)
            dtype = acc if name == "decay_mod" else q.dtype
            out.append(t.to(dtype) if isinstance(t, torch.Tensor) else t)
        return out

    def _mod_pass(self) -> Callable[..., Any]:
        if self.fuse_mods != "compile":
            return self._mods
        if self._compiled is None:
            self._compiled = torch.compile(self._mods, dynamic=True)
        return self._compiled

    def _runner(self, q: torch.Tensor) -> tuple[str, Callable[..., Any]]:
        """(name, run) of the forced backend, or refusal with its reason; unforced: the Triton
        kernel on CUDA where it can run, else the reference (the same computation)."""
        from attnrt.engine.linear_backends import RUNNERS, unavailable_reason

        if self.backend is None:
            fast = q.device.type == "cuda" and unavailable_reason("triton", q) is None
            name = "triton" if fast else "reference"
            return name, RUNNERS[name]
        reason = unavailable_reason(self.backend, q)
        if reason is not None:
            raise BackendUnavailableError(f"backend={self.backend!r} cannot run this call: "
                                          f"{reason}")
        return self.backend, RUNNERS[self.backend]


def _non_causal(q, k, v, h0, dtype):  # type: ignore[no-untyped-def]
    """out = q (S_0 + k^T v) per head: two matrix products, for every backend."""
    acc = accumulation_dtype(dtype)
    state = torch.einsum("bnhk,bnhv->bhkv", k.to(acc), v.to(acc))
    if h0 is not None:
        state = state + h0
    return torch.einsum("bnhk,bhkv->bnhv", q.to(acc), state).to(dtype), state
