"""Mean pooling of VSA's coarse stage: q, k, v [B, S, Hx, D] -> float32 [B, C, Hx, D], the
mean of each cube's valid tokens (its 64 slots summed over its valid count; padding slots hold
zeros). Two implementations of the same sum, chosen by POOL (bench/sparse_gpu.py --sweep
times both): "torch" (three reductions) and "triton" (one pass, one launch, vsa_jit.py).

Shapes: B batch, S = 64 * C slots, C cubes, H query heads, Hkv key/value heads, D head size.
"""

from __future__ import annotations

import torch

from .vsa_layout import CUBE_TOKENS

POOLS = ("torch", "triton")
POOL = "triton"


def pool_cubes(x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """[B, S, Hx, D] (padding zero) -> float32 [B, C, Hx, D] in torch."""
    b, s, h, d = x.shape
    summed = x.reshape(b, s // CUBE_TOKENS, CUBE_TOKENS, h, d).sum(2, dtype=torch.float32)
    return summed / sizes.view(1, -1, 1, 1)


class _PoolQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sizes):
        from ..kernels import next_power_of_2
        from .vsa_jit import _pool_kernel

        b, s, h, d = q.shape
        hkv, c = k.shape[2], s // CUBE_TOKENS
        if k.stride() != v.stride() or q.stride(-1) != 1 or k.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty((b, c, h + 2 * hkv, d), dtype=torch.float32, device=q.device)
        _pool_kernel[(c, b * (h + 2 * hkv))](
            q, k, v, sizes, out, q.stride(), k.stride(), out.stride(), h, hkv, HEAD_DIM=d,
            BLOCK_D=max(16, next_power_of_2(d)), CUBE=CUBE_TOKENS, num_warps=4)
        ctx.save_for_backward(sizes)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out[:, :, :h], out[:, :, h:h + hkv], out[:, :, h + hkv:]

    @staticmethod
    def backward(ctx, *grads):
        (sizes,) = ctx.saved_tensors
        return (*(_spread(g, sizes, dt) for g, dt in zip(grads, ctx.dtypes, strict=True)), None)


def _spread(g: torch.Tensor | None, sizes: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor | None:
    """The gradient of a cube mean: each of the cube's 64 slots gets g / valid count."""
    if g is None:
        return None
    b, c, h, d = g.shape
    per_slot = (g / sizes.view(1, -1, 1, 1)).to(dtype).unsqueeze(2)
    return per_slot.expand(b, c, CUBE_TOKENS, h, d).reshape(b, c * CUBE_TOKENS, h, d)


def pool_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: torch.Tensor,
             pool: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cube means of q, k, v (float32 [B, C, Hx, D] each), differentiable in q, k, v."""
    pool = POOL if pool is None else pool
    if pool == "torch":
        return pool_cubes(q, sizes), pool_cubes(k, sizes), pool_cubes(v, sizes)
    qc, kc, vc = _PoolQKV.apply(q, k, v, sizes)
    return qc, kc, vc
