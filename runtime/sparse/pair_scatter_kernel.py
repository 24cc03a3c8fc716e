"""Triton kernels of attnrt.sparse.pair_scatter (imports Triton; reached on CUDA and from
interpreter tests). One program per (block of pair rows, batch * head).

Shapes: out/d_out [B, P, H, D] (unit stride in D), share/d_share/token [B, H, P] contiguous,
merged/grad [B, N, H, D] (unit stride in D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scatter_fwd(OUT, SHARE, TOKEN, MERGED, P, N, H, s_o, s_m, D: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    live = rows < P
    share = tl.load(SHARE + bh.to(tl.int64) * P + rows, mask=live, other=0.0)
    tok = tl.load(TOKEN + bh.to(tl.int64) * P + rows, mask=live, other=0)
    live = live & (share != 0.0)
    mask = live[:, None] & (offs_d[None, :] < D)
    o = tl.load(OUT + b * s_o[0] + rows[:, None].to(tl.int64) * s_o[1] + h * s_o[2]
                + offs_d[None, :], mask=mask, other=0.0)
    dest = MERGED + b * s_m[0] + tok[:, None] * s_m[1] + h * s_m[2] + offs_d[None, :]
    tl.atomic_add(dest, o.to(tl.float32) * share[:, None], mask=mask)


@triton.jit
def _scatter_bwd(GRAD, OUT, SHARE, TOKEN, D_OUT, D_SHARE, P, N, H, s_g, s_o,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    live = rows < P
    share = tl.load(SHARE + bh.to(tl.int64) * P + rows, mask=live, other=0.0)
    tok = tl.load(TOKEN + bh.to(tl.int64) * P + rows, mask=live, other=0)
    mask = live[:, None] & (offs_d[None, :] < D)
    g = tl.load(GRAD + b * s_g[0] + tok[:, None] * s_g[1] + h * s_g[2] + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    at = b * s_o[0] + rows[:, None].to(tl.int64) * s_o[1] + h * s_o[2] + offs_d[None, :]
    o = tl.load(OUT + at, mask=mask, other=0.0).to(tl.float32)
    tl.store(D_OUT + at, (g * share[:, None]).to(D_OUT.dtype.element_ty), mask=mask)
    tl.store(D_SHARE + bh.to(tl.int64) * P + rows, tl.sum(g * o, 1), mask=live)


def _grid(out: torch.Tensor, block_p: int) -> tuple[int, int]:
    return triton.cdiv(out.shape[1], block_p), out.shape[0] * out.shape[2]


def scatter_forward(out: torch.Tensor, share: torch.Tensor, token: torch.Tensor,
                    n: int) -> torch.Tensor:
    """merged [B, N, H, D] float32 (see attnrt.sparse.pair_scatter)."""
    b, p, h, d = out.shape
    out = out if out.stride(-1) == 1 else out.contiguous()
    share, token = share.float().contiguous(), token.contiguous()
    merged = torch.zeros(b, n, h, d, dtype=torch.float32, device=out.device)
    block_d = max(16, triton.next_power_of_2(d))
    _scatter_fwd[_grid(out, 32)](out, share, token, merged, p, n, h, out.stride(),
                                 merged.stride(), D=d, BLOCK_D=block_d, BLOCK_P=32)
    return merged


def scatter_backward(grad: torch.Tensor, out: torch.Tensor, share: torch.Tensor,
                     token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_out [B, P, H, D] in out's dtype, d_share [B, H, P] float32)."""
    b, p, h, d = out.shape
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    out = out.contiguous()
    d_out = torch.full_like(out, float("nan"))
    d_share = torch.full(share.shape, float("nan"), dtype=torch.float32, device=out.device)
    block_d = max(16, triton.next_power_of_2(d))
    _scatter_bwd[_grid(out, 32)](grad, out, share.float().contiguous(), token.contiguous(),
                                 d_out, d_share, p, grad.shape[1], h, grad.stride(),
                                 out.stride(), D=d, BLOCK_D=block_d, BLOCK_P=32)
    return d_out, d_share.to(share.dtype)
