"""Context parallelism for the diffusers integration: the forward and backward "ops" diffusers'
templated ring / Ulysses attention calls per chunk of keys.

Shapes: B batch, N query sequence (local), M key sequence (this chunk), H heads, D head size.
Tensors [B, N, H, D]; lse [B, N, H] float32 (diffusers' layout).

diffusers' templated attention calls `forward_op(ctx, q, k, v, attn_mask, dropout_p, is_causal,
scale, enable_gqa, return_lse, _save_ctx=..., _parallel_config=...)` and merges the partial
results by their lse; in the backward, `backward_op(ctx, grad_out)` (Ulysses) or
`backward_op(ctx, grad_out, query=, key=, value=, out=, lse=)` (ring: this chunk's keys and the
merged out/lse). The forward is served through attnrt (SdpaRouter, return_lse=True); the
backward is the exact softmax gradient given the merged out and lse, in float32 pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from attnrt.integrations.sdpa_router import SdpaRouter


def make_forward_op(router: SdpaRouter) -> Callable[..., Any]:
    """diffusers' forward_op served by `router`."""

    def forward_op(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False, return_lse: bool = False, _save_ctx: bool = True,
                   _parallel_config: Any = None) -> Any:
        out, lse = router(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                          return_lse=True)
        if _save_ctx:
            ctx.save_for_backward(query, key, value)
            ctx.attnrt_call = (attn_mask, is_causal, scale, router)
        return (out, lse) if return_lse else out

    return forward_op


def backward_op(ctx: Any, grad_out: torch.Tensor, *args: Any, query: torch.Tensor | None = None,
                key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of this chunk, each [B, *, H, D], from grad_out [B, N, H, D]."""
    saved_q, saved_k, saved_v = ctx.saved_tensors[:3]
    q = saved_q if query is None else query
    k = saved_k if key is None else key
    v = saved_v if value is None else value
    mask, causal, scale, router = ctx.attnrt_call
    if out is None or lse is None:  # Ulysses: the local call is the whole attention
        out, lse = router(q, k, v, mask, 0.0, causal, scale, return_lse=True)
    return attention_grads(q, k, v, out, lse, grad_out, mask, causal, scale)


def attention_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, grad_out: torch.Tensor, mask: torch.Tensor | None,
                    causal: bool, scale: float | None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax-attention gradients given the (merged) out [B, N, H, D] and lse [B, N, H].

    Equivalent PyTorch (float32): p = exp(q k^T * scale - lse); dv = p^T dO;
    ds = p * (dO v^T - rowsum(dO * out)); dq = ds k * scale; dk = ds^T q * scale.
    Causal is top-left aligned (torch's is_causal); mask is bool (True: attend) or additive.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qt, kt, vt, ot, got = (t.to(acc).transpose(1, 2) for t in (q, k, v, out, grad_out))
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = qt @ kt.mT * scale
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(acc)
    p = torch.exp(s - lse.to(acc).transpose(1, 2).unsqueeze(-1)).nan_to_num(nan=0.0)
    dv = p.mT @ got
    delta = (got * ot).sum(-1, keepdim=True)
    ds = p * (got @ vt.mT - delta)
    dq, dk = ds @ kt * scale, ds.mT @ qt * scale
    return tuple(g.transpose(1, 2).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))  # type: ignore[return-value]
