"""Route torch SDPA calls made inside one module through attnrt, for processors that call
`torch.nn.functional.scaled_dot_product_attention` themselves instead of diffusers' dispatcher.

Shapes: B batch, H heads, N query sequence, M key sequence, D head size. torch's SDPA takes
[B, H, N, D]; the router takes [B, N, H, D] (transposed views, no copies).

A TorchFunctionMode is entered by a forward pre-hook and left by a forward hook that runs even
when the forward raises (always_call), so only SDPA calls made while that module runs are
routed; torch keeps its mode stack per thread, and each thread keeps its own stack of entered
modes here.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from attnrt.integrations.sdpa_router import SdpaRouter, check_call


def _sdpa_args(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, *,
               enable_gqa: bool = False, **unknown: Any) -> tuple[Any, ...]:
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, unknown


class SdpaToAttnrt(TorchFunctionMode):
    """While active, torch's SDPA calls are served by `router` (other functions pass through)."""

    def __init__(self, router: SdpaRouter) -> None:
        super().__init__()
        self.router = router

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        q, k, v, mask, dropout_p, causal, scale, gqa, unknown = _sdpa_args(*args,
                                                                           **(kwargs or {}))
        qn, kn, vn = (t.transpose(1, 2) if t.dim() == 4 else t for t in (q, k, v))
        check_call(qn, kn, mask, dropout_p, causal, gqa, unknown)
        out = self.router.serve(qn, kn, vn, mask, causal, scale, return_lse=False)
        return out.transpose(1, 2)  # type: ignore[union-attr]


def install_sdpa_hooks(module: nn.Module, router: SdpaRouter) -> list[Any]:
    """Hooks on `module` that route its SDPA calls through `router`; returns their handles."""
    local = threading.local()

    def enter(mod: nn.Module, args: Any) -> None:
        stack = local.__dict__.setdefault("stack", [])
        mode = SdpaToAttnrt(router)
        mode.__enter__()
        stack.append(mode)

    def leave(mod: nn.Module, args: Any, output: Any) -> None:
        local.stack.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter),
            module.register_forward_hook(leave, always_call=True)]
