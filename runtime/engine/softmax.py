"""AttentionEngine: a user-defined attention variant (score_mod, mask_mod, OnlineFunc) traced
once and run by generated Triton kernels, FlexAttention, or the pure-torch reference.

Shapes: B batch, N queries, M keys, H heads, Hkv kv heads, D head size, Dv value head size.
q [B, N, H, D], k [B, M, Hkv, D], v [B, M, Hkv, Dv] -> out [B, N, H, Dv].

    mod = AttentionEngine(qkv_meta, score_mod=alibi, custom_fwd_inputs=CustomIO(
        {"slopes": ("heads",)}), mask_mod=causal)
    out = mod(q, k, v, custom_inputs=[slopes]); out.backward(do)

The meaning of a variant is written out in engine/spec.py. score_mod receives the raw q . k
(AttentionEngine's convention: scale inside score_mod); with score_mod=None the score is
q . k / sqrt(D). `softmax_scale=x` makes score_mod receive q . k * x instead.
"""

from __future__ import annotations

from typing import Any

import torch

from attnrt.engine.call import check_call
from attnrt.engine.errors import EngineError, EngineInputError
from attnrt.engine.reference import RefFns, engine_reference, python_fns, traced_fns
from attnrt.engine.spec import CustomIO, Variant, meta_tensor, trace_variant
from attnrt.engine.trace import TraceError, check_arity, leaf

BACKENDS = ("auto", "triton", "flex", "reference")


def _check_meta(qkv_meta: Any) -> tuple[meta_tensor, ...] | None:
    if qkv_meta is None:
        return None
    if not isinstance(qkv_meta, tuple | list) or len(qkv_meta) != 3 or not all(
            isinstance(m, meta_tensor) for m in qkv_meta):
        raise TraceError(f"qkv_meta={qkv_meta!r} must be three meta_tensor(B, H, N, D, dtype)")
    return tuple(qkv_meta)


def triton_usable(q: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    import os

    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return q.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class AttentionEngine:
    """A compiled attention variant; call it like a function: mod(q, k, v, custom_inputs).

    backend: "auto" (generated Triton kernels where Triton runs q's device, else the
    reference), "triton", "flex" (FlexAttention; online softmax only) or "reference".
    What cannot be traced raises TraceError here, naming the function and line; such
    functions still run on backend="reference", which calls them on torch tensors.
    """

    def __init__(self, qkv_meta: Any = None, score_mod: Any = None,
                 custom_fwd_inputs: CustomIO | None = None, online_func: Any = None,
                 mask_mod: Any = None, *, softmax_scale: float | None = None,
                 backend: str = "auto", block_size: tuple[int, int] = (64, 64)) -> None:
        if backend not in BACKENDS:
            raise EngineInputError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
        self.meta = _check_meta(qkv_meta)
        self.score_mod, self.mask_mod = score_mod, mask_mod
        self.custom_fwd_inputs = custom_fwd_inputs or CustomIO()
        self.softmax_scale, self.backend, self.block_size = softmax_scale, backend, block_size
        self._flex_runner: Any = None  # made at the first flex call (engine/flex.py)
        try:
            self.variant: Variant | None = trace_variant(score_mod, mask_mod, online_func,
                                                         custom_fwd_inputs)
        except TraceError:
            if backend != "reference":
                raise
            self.variant = None
            self.fns = self._python_fns(online_func)
        else:
            self.fns = traced_fns(self.variant)
        self._checked = self.variant or _untraced(self.custom_fwd_inputs)

    def _python_fns(self, online_func: Any) -> RefFns:
        from attnrt.engine.online import trace_online

        if self.score_mod is not None:
            check_arity(self.score_mod, "score_mod", (6,))
        arity = check_arity(self.mask_mod, "mask_mod", (4, 5)) if self.mask_mod else 4
        return python_fns(self.score_mod, self.mask_mod, trace_online(online_func), arity)

    def _scale(self, q: torch.Tensor) -> float | None:
        if self.softmax_scale is not None:
            return float(self.softmax_scale)
        return q.shape[-1] ** -0.5 if self.score_mod is None else None

    def _check_meta_call(self, q: torch.Tensor, v: torch.Tensor) -> None:
        if self.meta is None:
            return
        mq, _, mv = self.meta
        if q.shape[-1] != mq.shape[3] or v.shape[-1] != mv.shape[3] or q.dtype != mq.dtype:
            raise EngineInputError(f"q {tuple(q.shape)} {q.dtype}, v {tuple(v.shape)} do not "
                                   f"match qkv_meta (D={mq.shape[3]}, Dv={mv.shape[3]}, "
                                   f"{mq.dtype})")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 custom_inputs: Any = None, cu_len_q: torch.Tensor | None = None,
                 cu_len_kv: torch.Tensor | None = None,
                 block_sparse_mask: torch.Tensor | None = None,
                 block_sparse_indices: torch.Tensor | None = None,
                 block_num: torch.Tensor | None = None) -> torch.Tensor:
        """Out [B, N, H, Dv] ([total_N, H, Dv] for 3D variable-length inputs)."""
        call = check_call(self._checked, q, k, v, custom_inputs, cu_len_q, cu_len_kv,
                          block_sparse_mask, block_sparse_indices, block_num, self.block_size)
        self._check_meta_call(call.q, call.v)
        out = self._run(call)
        return out.squeeze(0) if call.squeeze else out

    def backend_for(self, q: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        return "triton" if triton_usable(q) else "reference"

    def _run(self, call: Any) -> torch.Tensor:
        backend = self.backend_for(call.q)
        scale = self._scale(call.q)
        if backend == "reference":
            return engine_reference(self.fns, call, scale)[0]
        if self.variant is None:
            raise EngineError("untraced variants run on backend='reference' only")
        if backend == "flex":
            from attnrt.engine.flex import run_flex

            return run_flex(self, call, scale)
        from attnrt.engine.kernel import run_triton

        return run_triton(self.variant, self.fns, call, scale)

    def describe(self) -> str:
        """The traced variant as canonical text (the compiled-kernel cache key's source), or
        why it was not traced; B, N, H, D are bound at each call."""
        if self.variant is None:
            return (f"untraced (runs on backend='reference' only): score_mod="
                    f"{getattr(self.score_mod, '__qualname__', self.score_mod)}, mask_mod="
                    f"{getattr(self.mask_mod, '__qualname__', self.mask_mod)}")
        return f"variant {self.variant.key} (backend={self.backend})\n{self.variant.text}"

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  custom_inputs: Any = None, **layout: Any) -> tuple[torch.Tensor, dict]:
        """(out, final row scales {name: [B, H, N]}) from the pure-torch reference."""
        call = check_call(self._checked, q, k, v, custom_inputs, block_size=self.block_size,
                          **layout)
        out, finals = engine_reference(self.fns, call, self._scale(call.q))
        return (out.squeeze(0) if call.squeeze else out), finals


def _untraced(custom: CustomIO) -> Variant:
    """What call checks need of a variant that was not traced: its declared inputs."""
    return Variant(leaf("score"), None, None, tuple(custom.specs.items()),  # type: ignore
                   True, "", "")
