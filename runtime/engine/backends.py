"""The engine's implementations as attnrt backends (method "custom"): generated Triton kernels,
FlexAttention, and the pure-torch reference. Not registered here; see the engine report.

Shapes: q [B, N, H, D], k / v [B, M, Hkv, D] -> out [B, N, H, D].

A layer passes the variant as extra impl args: LocalAttention(..., score_mod=f, mask_mod=g,
online_func=OnlineSoftmax(), custom_fwd_inputs=CustomIO({...}), custom_inputs=[params]).
score_mod then receives q . k * softmax_scale (the layer's scale); causal=True adds the mask
kv_idx <= q_idx (N == M). The forward metadata may carry `custom_inputs`, `cu_len_q`,
`cu_len_kv`, `block_sparse_mask` or `block_sparse_indices` + `block_num` for one step.
What the Triton or Flex implementation cannot run (an untraceable function, a row reduction
FlexAttention lacks) raises KernelCompileError at the first forward, so the layer moves to the
next ranked implementation and the decision records why.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from attnrt.engine.errors import EngineError
from attnrt.engine.library import causal_mask
from attnrt.engine.softmax import AttentionEngine
from attnrt.engine.trace import TraceError, check_arity
from attnrt.errors import KernelCompileError
from attnrt.interfaces import AttentionBackend, ScaledImpl
from attnrt.kernels import TORCH_COMPILE_ERRORS, compile_error_types
from attnrt.selection.capability import PACKAGE_MISSING, Package, Reason

_LAYOUT = ("cu_len_q", "cu_len_kv", "block_sparse_mask", "block_sparse_indices", "block_num")
_VARIANT_ARGS = ("score_mod", "mask_mod", "online_func", "custom_fwd_inputs", "custom_inputs",
                 "block_size")


def _with_causal(mask_mod: Any) -> Any:
    if mask_mod is None:
        return causal_mask
    if check_arity(mask_mod, "mask_mod", (4, 5)) == 5:
        def causal_and5(b: Any, h: Any, q_idx: Any, kv_idx: Any, custom: Any) -> Any:
            return causal_mask(b, h, q_idx, kv_idx) & mask_mod(b, h, q_idx, kv_idx, custom)

        return causal_and5

    def causal_and(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return causal_mask(b, h, q_idx, kv_idx) & mask_mod(b, h, q_idx, kv_idx)

    return causal_and


class EngineImpl(ScaledImpl):
    """Runs one layer's variant on the backend class's ENGINE_BACKEND."""

    ENGINE_BACKEND: ClassVar[str] = "reference"
    EXTRA_IMPL_ARGS: ClassVar[frozenset[str]] = frozenset(_VARIANT_ARGS)

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "", **extra: Any) -> None:
        unknown = set(extra) - set(_VARIANT_ARGS)
        if unknown:
            raise TypeError(f"unknown engine arguments {sorted(unknown)}; allowed: "
                            f"{', '.join(_VARIANT_ARGS)}")
        super().__init__(num_heads, head_size, softmax_scale, causal, num_kv_heads, prefix,
                         **extra)
        mask = extra.get("mask_mod")
        self.custom_inputs = extra.get("custom_inputs")
        self.error: EngineError | None = None
        try:
            self.engine = AttentionEngine(
                None, extra.get("score_mod"), extra.get("custom_fwd_inputs"),
                extra.get("online_func"), _with_causal(mask) if causal else mask,
                softmax_scale=softmax_scale, backend=self.ENGINE_BACKEND,
                block_size=extra.get("block_size", (64, 64)))
            if self.ENGINE_BACKEND == "flex":
                from attnrt.engine.flex import FlexRunner

                if self.engine.variant is None:  # untraced variants stop at the trace above
                    raise EngineError("FlexAttention needs a traced variant")
                self.engine._flex_runner = FlexRunner(self.engine.variant)
        except (TraceError, EngineError) as exc:
            if self.ENGINE_BACKEND == "reference":
                raise
            self.error = exc

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        if self.error is not None:
            raise KernelCompileError(f"{self.ENGINE_BACKEND} engine: {self.error}")
        if self.causal and query.shape[1] != key.shape[1]:
            raise EngineError(f"causal custom attention needs N == M; got N={query.shape[1]}, "
                              f"M={key.shape[1]} (write the mask in mask_mod)")
        layout = {name: getattr(attn_metadata, name) for name in _LAYOUT
                  if getattr(attn_metadata, name, None) is not None}
        custom = getattr(attn_metadata, "custom_inputs", None)
        return self.engine(query, key, value, custom if custom is not None else
                           self.custom_inputs, **layout)


class TritonEngineImpl(EngineImpl):
    ENGINE_BACKEND = "triton"


class FlexEngineImpl(EngineImpl):
    ENGINE_BACKEND = "flex"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        """EngineImpl's forward; compiling FlexAttention failing (Dynamo or Inductor) becomes
        KernelCompileError, so the layer moves to the next ranked implementation."""
        try:
            return super().forward(query, key, value, attn_metadata)
        except compile_error_types(TORCH_COMPILE_ERRORS) as exc:
            raise KernelCompileError(f"flex engine: compiling FlexAttention failed: "
                                     f"{str(exc).splitlines()[0][:300]}") from exc


class _EngineBackend(AttentionBackend):
    METHODS = frozenset({"custom"})
    NAME: ClassVar[str] = ""
    IMPL: ClassVar[type[EngineImpl]] = EngineImpl

    @classmethod
    def get_name(cls) -> str:  # type: ignore[override]
        return cls.NAME

    @classmethod
    def get_impl_cls(cls) -> type[EngineImpl]:  # type: ignore[override]
        return cls.IMPL


class TritonEngineBackend(_EngineBackend):
    """Generated Triton kernels: CUDA sm80+, fp16 / bf16 / fp32, head sizes 16..256."""

    NAME = "ENGINE_TRITON"
    IMPL = TritonEngineImpl
    PLATFORMS = frozenset({"cuda"})
    ARCHS = ">=sm80"
    DTYPES = frozenset({"fp16", "bf16", "fp32"})
    HEAD_SIZES = range(16, 257, 8)
    PACKAGES = (Package("triton", min_version="3.1", hint="pip install triton"),)


class FlexEngineBackend(_EngineBackend):
    """torch FlexAttention: online-softmax variants only; no backward on CPU."""

    NAME = "ENGINE_FLEX"
    IMPL = FlexEngineImpl
    PLATFORMS = frozenset({"cuda", "cpu"})
    DTYPES = frozenset({"fp16", "bf16", "fp32"})
    HEAD_SIZES = (16, 32, 64, 128, 256)

    @classmethod
    def extra_reasons(cls, request: Any, device: Any) -> list[Reason]:
        reasons = []
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as exc:
            reasons.append(Reason(PACKAGE_MISSING, f"import flex_attention failed: {exc}",
                                  "torch >= 2.5"))
        if request.grad and device.platform == "cpu":
            reasons.append(Reason("GRAD", "grad=True is not supported by ENGINE_FLEX on cpu "
                                  "(FlexAttention has no CPU backward); supported: False"))
        return reasons


class ReferenceEngineBackend(_EngineBackend):
    """The pure-torch reference: any platform, dtype and head size; any variant."""

    NAME = "ENGINE_REFERENCE"
    IMPL = EngineImpl
