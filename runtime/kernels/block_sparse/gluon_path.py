"""The block-sparse kernel's Gluon forward on Hopper (gluon_fwd_sm90), switched on per block
size by options.GLUON_FORWARD (or options.gluon_forward / set_gluon_forward).

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size,
NQB = ceil(N / block_q), NKB = ceil(M / block_k), MAXK the length of each block list.

The module is imported on first use. One that does not import with the installed Triton, or
whose kernel fails to compile, is turned off for the process with one WARNING naming the
reason; launch._forward then runs the Triton kernel, the same computation. Errors raised while
a compiled kernel runs (CUDA errors) propagate.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from .. import compile_error_types
from .checks import NAME
from .options import gluon_forward_on

_MODULE = "gluon_fwd_sm90"
_LOADED: dict[str, ModuleType | None] = {}  # "forward" -> module, or None once turned off


def module() -> ModuleType | None:
    """The Gluon forward module, or None where it is off."""
    if "forward" not in _LOADED:
        try:
            _LOADED["forward"] = importlib.import_module(f"{__package__}.{_MODULE}")
        except Exception as exc:  # noqa: BLE001 (an optional fast path: any import failure)
            import triton

            turn_off(f"it does not import with Triton {triton.__version__}: {exc!r}")
    return _LOADED["forward"]


def turn_off(why: str) -> None:
    """Stop using the Gluon forward in this process, saying why once."""
    _LOADED["forward"] = None
    logging.getLogger("attnrt").warning(
        "%s: the Gluon forward is off (%s); the Triton forward serves instead", NAME, why)


def reset() -> None:
    """Forget the import (and a turned-off state); the next call imports again."""
    _LOADED.clear()


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
        turn_off(f"compiling it failed: {exc!r}"[:500])
        return False
    return True
