"""Linear attention kernels: attnrt's chunked Triton kernel and its pure-torch reference.

Shapes: B batch, N sequence, H heads, Dk query/key head size, Dv value head size.
q, k [B, N, H, Dk]; v [B, N, H, Dv]; g None | [B, N, H] | [B, N, H, Dk] natural-log decay;
states [B, H, Dk, Dv].

Importing this package needs torch alone; Triton is imported when the chunked kernel first runs.
"""

from __future__ import annotations

from attnrt.kernels.linear.errors import (
    LinearAttentionDeviceError,
    LinearAttentionError,
    LinearAttentionTypeError,
    ModShapeError,
)
from attnrt.kernels.linear.reference import linear_attention_reference, linear_attention_step


def chunked_linear_attention(*args, **kwargs):  # type: ignore[no-untyped-def]
    """The Triton kernel (attnrt.kernels.linear.chunked), imported on first use."""
    from attnrt.kernels.linear.chunked import chunked_linear_attention as run

    return run(*args, **kwargs)


__all__ = [
    "LinearAttentionDeviceError", "LinearAttentionError", "LinearAttentionTypeError",
    "ModShapeError", "chunked_linear_attention", "linear_attention_reference",
    "linear_attention_step",
]
