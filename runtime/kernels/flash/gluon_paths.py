"""TRITON_FLASH_ATTN's Gluon fast paths on Hopper: the forward (gluon_fwd_sm90) and the
backward (gluon_bwd_sm90), each switched on per call by the config's "gluon" switch.

Each module is imported on first use. One that does not import with the installed Triton, or
whose kernel fails to compile, is turned off for the process with one WARNING naming the
reason; triton_flash then runs its Triton kernels, the same computation. Errors raised while a
compiled kernel runs (CUDA errors) propagate.
"""

from __future__ import annotations

from types import ModuleType

import torch

from attnrt.kernels import compile_error_types
from attnrt.kernels.gluon_host import GluonSwitch

SWITCH = GluonSwitch("TRITON_FLASH_ATTN", __package__,
                     {"forward": "gluon_fwd_sm90", "backward": "gluon_bwd_sm90"})


def module(kind: str) -> ModuleType | None:
    """The Gluon module for "forward" or "backward", or None where it is off."""
    return SWITCH.module(kind)


def turn_off(kind: str, why: str) -> None:
    """Stop using the Gluon `kind` in this process, saying why once."""
    SWITCH.turn_off(kind, why)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
            entry: dict[str, int], out: torch.Tensor, lse: torch.Tensor,
            head_group: int, key: tuple | None = None) -> bool:
    """Runs the Gluon forward where `entry` (the config's "fwd") asks for it and it can serve
    these tensors; False where the caller must run its Triton forward. key: the caller's key
    for these tensors' launch (attnrt.kernels.fast_launch), if it has one."""
    if not (entry.get("gluon", 0) and q.is_cuda):
        return False
    gluon = module("forward")
    block_n = entry["BLOCK_N"]
    if gluon is None or not gluon.usable(q, k, v, out, block_n):
        return False
    try:
        gluon.forward(q, k, v, causal, scale, block_n, out, lse, head_group, key)
    except compile_error_types() as exc:
        SWITCH.compile_failed("forward", exc)
        return False
    return True


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
             lse2: torch.Tensor, delta: torch.Tensor, causal: bool, scale: float,
             entry: dict[str, int], grads: tuple[torch.Tensor, ...],
             head_group: int) -> bool:
    """Fills grads = (dq, dk, dv) with the Gluon backward where `entry` (the config's
    "bwd_dkdv") asks for it and it can serve; False where the caller must run its Triton
    kernels. lse2 and delta as triton_flash._backward_delta makes them. dQ's sum order varies
    between runs, so under torch.use_deterministic_algorithms(True) the Triton kernels serve."""
    if not (entry.get("gluon", 0) and q.is_cuda) or torch.are_deterministic_algorithms_enabled():
        return False
    gluon = module("backward")
    dq, dk, dv = grads
    if gluon is None or not gluon.usable(q, k, v, dout, dk, dv, lse2):
        return False
    acc = torch.zeros(tuple(q.shape), dtype=torch.float32, device=q.device)
    try:
        gluon.backward(q, k, v, dout, lse2, delta, causal, scale, acc, dk, dv, head_group)
    except compile_error_types() as exc:
        SWITCH.compile_failed("backward", exc)
        return False
    dq.copy_(acc)
    return True
