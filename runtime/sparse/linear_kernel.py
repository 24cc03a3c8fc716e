"""Triton kernel of SLA's fused linear branch: the visited part of linear attention.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size,
NQB = ceil(N / block_q), MAXK list length. a = phi(Q) [B, N, H, D], b = phi(K) [B, M, Hkv, D],
v [B, M, Hkv, D]; block lists as attnrt.kernels.block_sparse takes them.

For query block i with key-block list L_i:
    num_i = sum over j in L_i of (a_i b_j^T) v_j      [block_q, D]
    den_i = sum over j in L_i of (a_i b_j^T) 1        [block_q]
i.e. block-sparse attention with the softmax replaced by the plain product. SLA's unvisited
linear branch is (totals - visited). Forward: one program per (query block, batch * head).
Backward: the same walk; da per query block, db and dv accumulated with float32 atomics (so
not bitwise deterministic); its dots take the inputs' dtype (bf16/fp16: the incoming
gradients are rounded to it, as flash backward kernels round P and dS).
Imports Triton: reached only from linear_branch on CUDA and from tests.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(ptr, rows, n_rows, offs_d, D: tl.constexpr, stride_row):
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < D)
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :], mask=mask,
                   other=0.0)


@triton.jit
def _visited_fwd(A, Bk, V, NUM, DEN, IDX, CNT, N, M, H, GROUP, s_a, s_b, s_i, s_c,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    a = _tile(A + b * s_a[0] + h * s_a[2], rows, N, offs_d, D, s_a[1])
    b_h = Bk + b * s_b[0] + (h // GROUP) * s_b[2]
    v_h = V + b * s_b[0] + (h // GROUP) * s_b[2]
    idx = IDX + b * s_i[0] + h * s_i[1] + qb * s_i[2]
    count = tl.load(CNT + b * s_c[0] + h * s_c[1] + qb * s_c[2])
    num = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for t in range(count):
        keys = tl.load(idx + t * s_i[3]) * BLOCK_K + tl.arange(0, BLOCK_K)
        kb = _tile(b_h, keys, M, offs_d, D, s_b[1])
        vb = _tile(v_h, keys, M, offs_d, D, s_b[1])
        s = tl.dot(a, tl.trans(kb), input_precision=PREC)
        den += tl.sum(s, 1)
        num += tl.dot(s.to(vb.dtype), vb, input_precision=PREC)
    out = NUM + b * s_a[0] + h * s_a[2] + rows[:, None].to(tl.int64) * s_a[1] + offs_d[None, :]
    tl.store(out, num, mask=(rows[:, None] < N) & (offs_d[None, :] < D))
    tl.store(DEN + (b * H + h) * N + rows, den, mask=rows < N)


@triton.jit
def _visited_bwd(A, Bk, V, DNUM, DDEN, DA, DB, DV, IDX, CNT, N, M, H, GROUP, s_a, s_b, s_i,
                 s_c, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    a = _tile(A + b * s_a[0] + h * s_a[2], rows, N, offs_d, D, s_a[1])
    dnum = _tile(DNUM + b * s_a[0] + h * s_a[2], rows, N, offs_d, D, s_a[1])
    dden = tl.load(DDEN + (b * H + h) * N + rows, mask=rows < N, other=0.0)
    kv_off = b * s_b[0] + (h // GROUP) * s_b[2]
    idx = IDX + b * s_i[0] + h * s_i[1] + qb * s_i[2]
    count = tl.load(CNT + b * s_c[0] + h * s_c[1] + qb * s_c[2])
    da = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    dn = dnum.to(a.dtype)  # 16-bit operands keep the dots on tensor cores and shared memory low
    for t in range(count):
        keys = tl.load(idx + t * s_i[3]) * BLOCK_K + tl.arange(0, BLOCK_K)
        kb = _tile(Bk + kv_off, keys, M, offs_d, D, s_b[1])
        vb = _tile(V + kv_off, keys, M, offs_d, D, s_b[1])
        s = tl.dot(a, tl.trans(kb), input_precision=PREC)
        ds = tl.dot(dn, tl.trans(vb.to(a.dtype)), input_precision=PREC) + dden[:, None]
        da += tl.dot(ds.to(a.dtype), kb.to(a.dtype), input_precision=PREC)
        ptrs = keys[:, None].to(tl.int64) * s_b[1] + offs_d[None, :]
        mask = (keys[:, None] < M) & (offs_d[None, :] < D)
        tl.atomic_add(DB + kv_off + ptrs, tl.dot(tl.trans(ds.to(a.dtype)), a,
                                                 input_precision=PREC), mask=mask)
        tl.atomic_add(DV + kv_off + ptrs, tl.dot(tl.trans(s.to(a.dtype)), dn,
                                                 input_precision=PREC), mask=mask)
    out = DA + b * s_a[0] + h * s_a[2] + rows[:, None].to(tl.int64) * s_a[1] + offs_d[None, :]
    tl.store(out, da, mask=(rows[:, None] < N) & (offs_d[None, :] < D))


def _launch(kernel: Any, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor,
            count: torch.Tensor, block_q: int, block_k: int, *tensors: torch.Tensor,
            stages: int = 3) -> None:
    bsz, n, h, d = a.shape
    grid = (index.shape[2], bsz * h)
    block_d = max(16, triton.next_power_of_2(d))
    prec = "ieee" if a.dtype == torch.float32 else "tf32"
    kernel[grid](*tensors, index, count, n, b.shape[1], h, h // b.shape[2], a.stride(),
                 b.stride(), index.stride(), count.stride(), D=d, BLOCK_D=block_d,
                 BLOCK_Q=block_q, BLOCK_K=block_k, PREC=prec,
                 num_warps=8 if block_q * block_d >= 128 * 128 else 4, num_stages=stages)


class _Visited(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, v: torch.Tensor,
                index: torch.Tensor, count: torch.Tensor, block_q: int, block_k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        num = torch.full(a.shape, float("nan"), dtype=torch.float32, device=a.device)
        den = torch.full((a.shape[0], a.shape[2], a.shape[1]), float("nan"),
                         dtype=torch.float32, device=a.device)
        _launch(_visited_fwd, a, b, index, count, block_q, block_k, a, b, v, num, den)
        ctx.save_for_backward(a, b, v, index, count)
        ctx.blocks = (block_q, block_k)
        return num, den.transpose(1, 2)

    @staticmethod
    def backward(ctx: Any, dnum: torch.Tensor, dden: torch.Tensor) -> tuple[Any, ...]:
        a, b, v, index, count = ctx.saved_tensors
        dnum = dnum.float().contiguous()
        dden = dden.float().transpose(1, 2).contiguous()  # [B, H, N]
        da = torch.full(a.shape, float("nan"), dtype=torch.float32, device=a.device)
        db = torch.zeros(b.shape, dtype=torch.float32, device=a.device)
        dv = torch.zeros(b.shape, dtype=torch.float32, device=a.device)
        _launch(_visited_bwd, a, b, index, count, *ctx.blocks, a, b, v, dnum, dden, da, db, dv,
                stages=2)
        return da.to(a.dtype), db.to(b.dtype), dv.to(v.dtype), None, None, None, None


def visited_linear_triton(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor,
                          block_index: torch.Tensor, block_count: torch.Tensor, block_q: int,
                          block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num [B, N, H, D] float32, den [B, N, H] float32): see the module docstring.
    Equivalent PyTorch: attnrt.sparse.linear_branch.visited_linear_torch."""
    a, b, v = (t.contiguous() for t in (a, b, v))
    return _Visited.apply(a, b, v, block_index, block_count, block_q, block_k)
