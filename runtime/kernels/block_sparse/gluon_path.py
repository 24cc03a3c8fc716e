"""The block-sparse kernel's Gluon forward and backward on Hopper (gluon_fwd_sm90,
gluon_bwd_sm90), switched on per block size by options.GLUON_FORWARD / GLUON_BACKWARD (or
options.gluon_forward / gluon_backward and set_gluon_forward / set_gluon_backward).

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size,
NQB = ceil(N / block_q), NKB = ceil(M / block_k), MAXK the length of each block list,
NP = NQB * block_q.

Each module is imported on first use. One that does not import with the installed Triton, or
whose kernel fails to compile, is turned off for the process with one WARNING naming the
reason; launch then runs the Triton kernels, the same computation. Errors raised while a
compiled kernel runs (CUDA errors) propagate.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .. import compile_error_types
from ..gluon_host import GluonSwitch
from .checks import NAME
from .options import gluon_backward_on, gluon_forward_on

SWITCH = GluonSwitch(NAME, __package__, {"forward": "gluon_fwd_sm90", "backward": "gluon_bwd_sm90"})


def module(kind: str = "forward") -> ModuleType | None:
    """The Gluon module of `kind` ("forward" or "backward"), or None where it is off."""
    return SWITCH.module(kind)


def turn_off(why: str, kind: str = "forward") -> None:
    """Stop using the Gluon `kind` in this process, saying why once."""
    SWITCH.turn_off(kind, why)


def reset() -> None:
    """Forget the imports (and turned-off states); the next call imports again."""
    SWITCH.reset()


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
            count: torch.Tensor, valid: torch.Tensor | None, row_mask: torch.Tensor | None,
            block_q: int, block_k: int, scale: float, out: torch.Tensor,
            lse: torch.Tensor) -> bool:
    """Fills out [B, N, H, D] and lse [B, H, N] with the Gluon forward where the switch asks
    for these block sizes and the kernel can serve the inputs; False where the caller must run
    its Triton forward."""
    if not (q.is_cuda and gluon_forward_on(block_q, block_k)):
        return False
    gluon = module()
    if gluon is None or gluon.usable(q, k, v, index, count, row_mask, block_q,
                                     block_k) is not None:
        return False
    try:
        gluon.forward(q, k, v, index, count, valid, block_q, block_k, scale, out, lse)
    except compile_error_types() as exc:
        SWITCH.compile_failed("forward", exc)
        return False
    return True


def backward_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                    row_mask: torch.Tensor | None, block_q: int, block_k: int,
                    deterministic: bool, switched_on: bool | None = None) -> bool:
    """Whether the Gluon backward is switched on for these block sizes and can serve the
    inputs (checked before the transposed lists are built; `backward` checks them too).
    switched_on: the switch as the forward saw it (autograd runs a CUDA backward on its own
    thread, where a `gluon_backward()` block's scope is not visible); None reads it here."""
    if switched_on is None:
        switched_on = gluon_backward_on(block_q, block_k)
    if not (q.is_cuda and switched_on):
        return False
    gluon = module("backward")
    return gluon is not None and gluon.usable(q, k, v, dout, None, row_mask, block_q, block_k,
                                              deterministic) is None


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
             lse2: torch.Tensor, delta: torch.Tensor, k2q: torch.Tensor,
             k2q_count: torch.Tensor, valid: torch.Tensor | None, block_q: int, block_k: int,
             scale: float, dq_acc: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> bool:
    """Adds dQ into dq_acc [B, N, H, D] (float32, zeroed) and writes dk, dv [B, M, Hkv, D] with
    the Gluon backward where backward_usable held; False where the caller must run its Triton
    backward (the lists do not fit int32 offsets, or the kernel did not compile)."""
    gluon = module("backward")
    if gluon is None or gluon.usable(q, k, v, dout, k2q, None, block_q, block_k,
                                     False) is not None:
        return False
    try:
        gluon.backward(q, k, v, dout, lse2, delta, k2q, k2q_count, valid, block_q, block_k,
                       scale, dq_acc, dk, dv)
    except compile_error_types() as exc:
        SWITCH.compile_failed("backward", exc)
        return False
    return True
