"""merge_partials in one pass: two partial attention outputs and their lse -> the merged output.

`attnrt.interfaces.merge_partials` calls `merge_into` for CUDA tensors when Triton imports. One
program takes BLOCK_S rows of one head: it reads both partial rows and both lse once and writes
the merged row straight into `out`, which may be a strided view (the own heads of a wider
output, as local-first Ulysses writes them). PyTorch's lerp with a broadcast weight and a
strided output takes its generic elementwise path instead (~1.8 TB/s measured on H200: see
bench/NOTES-distributed.md). The weight is computed in float32, as the pure-torch merge's
`sigmoid(lse_a - lse_b)` with NaN (both -inf: a row that saw no key) taken as 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_S = 32


@triton.jit
def _merge_kernel(out_a, out_b, out, lse_a, lse_b, S, H, HEAD_DIM,
                  sa_b, sa_s, sa_h, sb_b, sb_s, sb_h, so_b, so_s, so_h,
                  la_b, la_h, lb_b, lb_h,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)  # axis 0: B * H may pass the 65535 limit of the other axes
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    b, h = bh // H, bh % H
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < S
    mask = row_ok[:, None] & (cols < HEAD_DIM)[None, :]
    diff = (tl.load(lse_a + b * la_b + h * la_h + rows, mask=row_ok, other=0.0)
            - tl.load(lse_b + b * lb_b + h * lb_h + rows, mask=row_ok, other=0.0))
    diff = tl.where(diff == diff, diff, 0.0)  # NaN: both parts saw no key, any weight will do
    weight = (1.0 / (1.0 + tl.exp(-diff)))[:, None]
    a = tl.load(out_a + b * sa_b + rows[:, None] * sa_s + h * sa_h + cols[None, :], mask=mask)
    o_b = tl.load(out_b + b * sb_b + rows[:, None] * sb_s + h * sb_h + cols[None, :], mask=mask)
    merged = o_b.to(tl.float32) + weight * (a.to(tl.float32) - o_b.to(tl.float32))
    tl.store(out + b * so_b + rows[:, None] * so_s + h * so_h + cols[None, :],
             merged.to(out.dtype.element_ty), mask=mask)


def merge_into(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
               lse_b: torch.Tensor, out: torch.Tensor) -> None:
    """out [B, N, H, D] (any strides, last dim unit) = the merge of out_a, out_b [B, N, H, D]
    (last dim unit) weighted by lse_a, lse_b [B, H, N] float32 (last dim unit)."""
    b, s, h, d = out.shape
    for name, t in (("out_a", out_a), ("out_b", out_b), ("out", out)):
        if t.shape != out.shape or t.stride(3) != 1:
            raise ValueError(f"merge_into: {name} must be {tuple(out.shape)} with a unit-strided "
                             f"head dim, got shape {tuple(t.shape)} strides {t.stride()}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != (b, h, s) or t.dtype != torch.float32 or t.stride(2) != 1:
            raise ValueError(f"merge_into: {name} must be float32 {(b, h, s)} with unit stride "
                             f"in N, got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
    grid = (b * h, triton.cdiv(s, BLOCK_S))
    _merge_kernel[grid](out_a, out_b, out, lse_a, lse_b, s, h, d,
                        out_a.stride(0), out_a.stride(1), out_a.stride(2),
                        out_b.stride(0), out_b.stride(1), out_b.stride(2),
                        out.stride(0), out.stride(1), out.stride(2),
                        lse_a.stride(0), lse_a.stride(1), lse_b.stride(0), lse_b.stride(1),
                        BLOCK_S=BLOCK_S, BLOCK_D=triton.next_power_of_2(d), num_warps=4)
