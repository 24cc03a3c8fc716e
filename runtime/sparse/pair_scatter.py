"""VMoBA's weighted scatter of pair outputs onto their tokens: the memory-bound half of the
merge, as one pass (Triton on CUDA, float32 atomics) instead of PyTorch's cast, multiply and
scatter_add passes.

Shapes: B batch, P packed pair rows, N tokens, H heads, D head size.
    merged[b, token[b, h, p], h] += share[b, h, p] * out[b, p, h]      (float32)
Backward: d_out[b, p, h] = share * d_merged[b, token, h]; d_share = d_merged[b, token, h] .
out[b, p, h]. Rows with share 0 (padding) are skipped. The atomics make the forward's
summation order, and so its last bits, vary between runs.
"""

from __future__ import annotations

from typing import Any

import torch


def weighted_scatter(out: torch.Tensor, share: torch.Tensor, token: torch.Tensor,
                     n: int) -> torch.Tensor:
    """out [B, P, H, D], share [B, H, P] float32, token int64 [B, H, P] -> [B, N, H, D]
    float32 (float64 for float64 out); differentiable in out and share.

    Equivalent PyTorch: zeros.scatter_add over the token axis of out * share."""
    return _WeightedScatter.apply(out, share, token, n)


def _torch_forward(out: torch.Tensor, share: torch.Tensor, token: torch.Tensor,
                   n: int) -> torch.Tensor:
    b, _, h, d = out.shape
    acc = torch.promote_types(out.dtype, torch.float32)
    parts = out.transpose(1, 2).to(acc) * share.to(acc)[..., None]  # [B, H, P, D]
    merged = torch.zeros(b, h, n, d, dtype=acc, device=out.device)
    merged.scatter_add_(2, token[..., None].expand(-1, -1, -1, d), parts)
    return merged.transpose(1, 2)


def _torch_backward(grad: torch.Tensor, out: torch.Tensor, share: torch.Tensor,
                    token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = out.shape[-1]
    g = torch.gather(grad.transpose(1, 2), 2, token[..., None].expand(-1, -1, -1, d))
    d_out = (g * share.to(g.dtype)[..., None]).transpose(1, 2).to(out.dtype)
    d_share = (g * out.transpose(1, 2).to(g.dtype)).sum(-1).to(share.dtype)
    return d_out, d_share


class _WeightedScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, share: torch.Tensor, token: torch.Tensor,
                n: int) -> torch.Tensor:
        ctx.save_for_backward(out, share, token)
        if out.is_cuda and out.dtype != torch.float64:
            from .pair_scatter_kernel import scatter_forward  # Triton: imported on CUDA only

            return scatter_forward(out, share, token, n)
        return _torch_forward(out, share, token, n)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        out, share, token = ctx.saved_tensors
        if out.is_cuda and out.dtype != torch.float64:
            from .pair_scatter_kernel import scatter_backward

            d_out, d_share = scatter_backward(grad, out, share, token)
        else:
            d_out, d_share = _torch_backward(grad, out, share, token)
        return d_out, d_share, None, None
