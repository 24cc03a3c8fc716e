"""Each ring piece's backward: a kernel where one serves the tensors' device, torch elsewhere.

Shapes: B batch, n query rows and m key rows of one piece, H heads, Hkv kv heads, D head size;
q, out, dout [B, n, H, D], k, v [B, m, Hkv, D], lse, delta [B, H, n] (the merged, final ones).

The ring's backward (attnrt.parallel.ring) runs every piece of every step through one
`PieceBackward`, chosen once per ring call by name:

    "torch"   ring_math.piece_grads: flash attention's backward formula in plain torch, fp32
              (fp64 for fp64 inputs), in row chunks; any device, any dtype (the gloo/CPU path)
    "triton"  TRITON_FLASH_ATTN's backward kernels (attnrt.kernels.flash.launch.
              flash_attention_backward) with the device's block config; dq/dk/dv per piece come
              back in the inputs' dtype and are summed in fp32 by the ring
    "auto"    "triton" where TRITON_FLASH_ATTN's declared capability (platform, arch, dtype,
              head size, triton installed) admits the piece on the tensors' device, "torch"
              elsewhere; `PieceBackward.reason` says why (attnrt's capability check's reasons)

Both compute p = exp(q k^T * scale - lse) from the final lse, so a piece's gradients are its
exact share of the whole sequence's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnrt.errors import AttnrtError
from attnrt.parallel.ring_math import piece_grads

logger = logging.getLogger("attnrt")
PIECE_BACKWARDS = ("auto", "torch", "triton")
Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# grads(q, k, v, out, dout, lse, delta, causal) -> (dq, dk, dv); dout in q's dtype for "triton",
# in the accumulation dtype for "torch" (ring_backward hands each what it reads).
PieceGrads = Callable[..., Grads]


class PieceBackwardError(AttnrtError, ValueError):
    """piece_backward= names no choice, or a kernel that cannot run these tensors."""


@dataclass(frozen=True)
class PieceBackward:
    """The backward every piece of one ring call runs: `name` ("torch" or "triton"), why."""

    name: str
    reason: str
    grads: PieceGrads

    @property
    def wants_input_dtype(self) -> bool:
        """Whether dout goes in q's dtype (a kernel) rather than the accumulation dtype."""
        return self.name == "triton"


def torch_backward(scale: float, reason: str = "asked for") -> PieceBackward:
    def grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              dout: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, causal: bool) -> Grads:
        return piece_grads(q, k, v, dout, lse, delta, causal, scale)

    return PieceBackward("torch", reason, grads)


def triton_backward(scale: float, config: dict | None, reason: str = "asked for",
                    ) -> PieceBackward:
    """config: TRITON_FLASH_ATTN's block config (None: the kernel's DEFAULT_CONFIG). A kernel
    that fails to compile is logged and the torch formula serves that piece (the same
    gradients); under ATTNRT_STRICT=1 the failure raises."""
    def grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              dout: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, causal: bool) -> Grads:
        from attnrt.kernels import compile_error_types
        from attnrt.kernels.flash.launch import flash_attention_backward
        from attnrt.selection.dispatch import strict_mode

        try:
            return flash_attention_backward(q, k, v, out, lse, dout, causal, scale, config)
        except compile_error_types() as exc:
            if strict_mode():
                raise
            logger.warning("ring piece backward: TRITON_FLASH_ATTN failed to compile for "
                           "q%s, k%s, %s (%s: %s); the torch formula serves this piece (set "
                           "ATTNRT_STRICT=1 to make this an error)", tuple(q.shape),
                           tuple(k.shape), q.dtype, type(exc).__name__,
                           str(exc).strip().splitlines()[-1:])
            return piece_grads(q, k, v, dout, lse, delta, causal, scale)

    return PieceBackward("triton", reason, grads)


def choose_piece_backward(choice: str, q: torch.Tensor, k: torch.Tensor, causal: bool,
                          scale: float) -> PieceBackward:
    """The PieceBackward for pieces of q [B, *, H, D] over k [B, *, Hkv, D] (module doc)."""
    if choice not in PIECE_BACKWARDS:
        raise PieceBackwardError(f"piece_backward={choice!r} is not allowed; allowed: "
                                 f"{', '.join(map(repr, PIECE_BACKWARDS))}")
    if choice == "torch":
        return torch_backward(scale)
    if choice == "triton":
        problem = _kernel_problem(q, k)
        if problem:
            raise PieceBackwardError(f"piece_backward='triton' cannot run here: {problem}; "
                                     "allowed: 'torch' or 'auto'")
        return triton_backward(scale, _config(q), "asked for")
    reasons = _capability_reasons(q.device, q.dtype, q.shape[3], q.shape[2], k.shape[2], causal)
    if reasons:
        return torch_backward(scale, f"TRITON_FLASH_ATTN cannot: {'; '.join(reasons)}")
    return triton_backward(scale, _config(q), "TRITON_FLASH_ATTN serves this device")


def _kernel_problem(q: torch.Tensor, k: torch.Tensor) -> str:
    """What keeps the kernel from these tensors ('' if nothing): what its own checks refuse."""
    from attnrt.kernels.flash.checks import HEAD_SIZES, SUPPORTED_DTYPES

    interpreted = q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if q.device.type != "cuda" and not interpreted:
        return f"q.device={q.device}; the kernel runs on cuda (or cpu with TRITON_INTERPRET=1)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"q.dtype={q.dtype}; the kernel takes float16, bfloat16, float32"
    if q.shape[3] not in HEAD_SIZES:
        return f"head_size={q.shape[3]}; the kernel takes multiples of 8 from 32 to 256"
    if q.shape[2] % k.shape[2]:
        return f"{q.shape[2]} heads over {k.shape[2]} kv heads"
    return ""


def _capability_reasons(device: torch.device, dtype: torch.dtype, head_size: int, heads: int,
                        kv_heads: int, causal: bool) -> tuple[str, ...]:
    """Why TRITON_FLASH_ATTN's declared capability refuses these pieces (empty: it serves).
    Not cached: probes and package checks are (dispatch.clear_caches clears them)."""
    from attnrt.backends.triton_flash import TritonFlashAttnBackend
    from attnrt.selection.capability import check
    from attnrt.selection.device import device_for_tensor
    from attnrt.selection.request import DTYPE_NAMES, AttentionRequest

    if dtype not in DTYPE_NAMES or heads % kv_heads:
        return (f"dtype={dtype}, {heads} heads over {kv_heads} kv heads",)
    request = AttentionRequest(head_size, DTYPE_NAMES[dtype], heads, kv_heads, causal,
                               grad=True)
    try:
        found = device_for_tensor(device)
    except AttnrtError as exc:
        return (str(exc),)
    return tuple(r.message for r in check(TritonFlashAttnBackend, request, found))


def _config(q: torch.Tensor) -> dict | None:
    """The block config TRITON_FLASH_ATTN uses on q's device (None off its platforms)."""
    if q.device.type == "cpu":
        return None
    from attnrt.backends.triton_flash import config_for

    return config_for(q)


__all__ = ["PIECE_BACKWARDS", "PieceBackward", "PieceBackwardError", "choose_piece_backward",
           "torch_backward", "triton_backward"]
