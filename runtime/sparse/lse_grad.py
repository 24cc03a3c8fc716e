"""Block-sparse attention whose log-sum-exp is differentiable too.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size.

Merging partial attentions (VMoBA's per-chunk results) needs d(lse) as well as d(out). The
shared kernel's autograd covers out; this adds lse's part without relying on whether the kernel
propagates it (its lse is detached here and the gradient rebuilt):
    d lse_i / d q_i = scale * sum_j p_ij k_j   (attention with the keys as values)
    d lse_i / d k_j = scale * p_ij q_i          (the value-gradient of attention for dout = q)
so the backward runs the kernel once forward (keys as values) and once backward.
"""

from __future__ import annotations

from typing import Any

import torch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: dict[str, Any],
            return_lse: bool = False) -> Any:
    from attnrt.kernels.block_sparse import block_sparse_attention

    return block_sparse_attention(q, k, v, spec["index"], spec["count"],
                                  block_q=spec["block_q"], block_k=spec["block_k"],
                                  key_block_valid=spec["valid"], softmax_scale=spec["scale"],
                                  return_lse=return_lse)


class _LseGrad(torch.autograd.Function):
    """Identity on lse [B, H, N]; its backward gives lse's gradient in q and k."""

    @staticmethod
    def forward(ctx: Any, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                spec: dict[str, Any]) -> torch.Tensor:
        ctx.save_for_backward(q, k)
        ctx.spec = spec
        return lse.clone()

    @staticmethod
    def backward(ctx: Any, dlse: torch.Tensor) -> tuple[Any, ...]:
        q, k = ctx.saved_tensors
        spec = ctx.spec
        weight = torch.nan_to_num(dlse, nan=0.0).transpose(1, 2)[..., None]  # [B, N, H, 1]
        with torch.no_grad():
            keys_as_values = _attend(q, k, k, spec)
        dq = (spec["scale"] * weight * keys_as_values.float()).to(q.dtype)
        with torch.enable_grad():
            slot = k.detach().requires_grad_()
            out = _attend(q.detach(), k.detach(), slot, spec)
            (dk,) = torch.autograd.grad(out, slot, (spec["scale"] * weight * q.float()).to(
                out.dtype))
        return None, dq, dk, None


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                       count: torch.Tensor, block_q: int, block_k: int,
                       key_block_valid: torch.Tensor | None, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """block_sparse_attention(..., return_lse=True) with both outputs differentiable:
    out [B, N, H, D], lse [B, H, N] float32 (natural log; -inf for a row with no key)."""
    spec = {"index": index, "count": count, "block_q": block_q, "block_k": block_k,
            "valid": key_block_valid, "scale": scale}
    out, lse = _attend(q, k, v, spec, return_lse=True)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        lse = _LseGrad.apply(lse.detach(), q, k, spec)
    return out, lse
