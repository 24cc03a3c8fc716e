"""The impl LocalAttention builds for method `linear` (one subclass per backend sets RUN).

Shapes: B batch, N sequence, H heads, D head size; q, k, v [B, N, H, D] -> out [B, N, H, D].

Extra impl args (passed to LocalAttention(..., **extra)): q_mod, k_mod, v_mod, decay_mod and
custom_io (a CustomIO) as for LinearAttentionEngine; `decay` (a tensor the mods see as decay:
[H] for a per-head constant, or None), `custom_inputs` (the custom tensors, list or dict) and
`fuse_mods` (as LinearAttentionEngine's).
A per-call decay ([B, N, H] or [B, N, H, D] gates) comes in the forward's metadata as
`attn_metadata.linear_decay` (and then `decay` must not also be given). The layer's
softmax_scale multiplies q after q_mod (flash-linear-attention's `scale`; pass 1.0 for none).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from attnrt.engine.linear import CustomIO, LinearAttentionEngine
from attnrt.interfaces import AttentionMetadata, ScaledImpl
from attnrt.kernels.linear.errors import LinearAttentionError

EXTRA_ARGS = ("q_mod", "k_mod", "v_mod", "decay_mod", "custom_io", "decay", "custom_inputs",
              "fuse_mods")


class LinearAttnImpl(ScaledImpl):
    """Runs LinearAttentionEngine on backend RUN ("triton", "fla" or "reference")."""

    RUN: ClassVar[str] = "reference"
    EXTRA_IMPL_ARGS: ClassVar[frozenset[str]] = frozenset(EXTRA_ARGS)

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "",
                 **extra_impl_args: Any) -> None:
        super().__init__(num_heads, head_size, softmax_scale, causal, num_kv_heads, prefix,
                         **extra_impl_args)
        unknown = sorted(set(extra_impl_args) - set(EXTRA_ARGS))
        if unknown:
            raise LinearAttentionError(f"extra_impl_args {unknown} are not allowed for method "
                                       f"linear; allowed: {', '.join(EXTRA_ARGS)}")
        if self.num_kv_heads != num_heads:
            raise LinearAttentionError(f"num_kv_heads={self.num_kv_heads} is not allowed for "
                                       f"method linear; allowed: num_heads={num_heads}")
        self.decay = extra_impl_args.get("decay")
        self.custom_inputs = extra_impl_args.get("custom_inputs")
        self._mods = {name: extra_impl_args.get(name) for name in EXTRA_ARGS[:4]}
        self._custom_io: CustomIO | None = extra_impl_args.get("custom_io")
        self._fuse = extra_impl_args.get("fuse_mods", "kernel")
        self._engines: dict[torch.dtype, LinearAttentionEngine] = {}

    def _engine(self, q: torch.Tensor) -> LinearAttentionEngine:
        key = q.dtype  # the engine checks heads, head sizes and dtype; B and N may vary
        if key not in self._engines:
            scale, q_mod = self.softmax_scale, self._mods["q_mod"]

            def scaled_q(t: torch.Tensor, io: CustomIO) -> torch.Tensor:
                return (t if q_mod is None else q_mod(t, io)) * scale

            meta = torch.empty(q.shape, dtype=q.dtype, device="meta")
            self._engines[key] = LinearAttentionEngine(
                (meta, meta, meta), q_mod=scaled_q, k_mod=self._mods["k_mod"],
                v_mod=self._mods["v_mod"], decay_mod=self._mods["decay_mod"],
                custom_io=self._custom_io, causal=self.causal, backend=self.RUN,
                fuse_mods=self._fuse)
        return self._engines[key]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        per_call = getattr(attn_metadata, "linear_decay", None)
        if per_call is not None and self.decay is not None:
            raise LinearAttentionError(
                "attn_metadata.linear_decay and the layer's decay are both given; allowed: one")
        decay = per_call if per_call is not None else self.decay
        out: torch.Tensor = self._engine(query)(query, key, value, decay, self.custom_inputs)
        return out
