"""FlashAttention-2-style attention in Triton: forward, and backward without atomics.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size.
Inputs are q [B, N, H, D] and k, v [B, M, Hkv, D]; any strides (passed to the kernels, never
copied). Query head h reads key/value head h // (H // Hkv) (GQA/MQA), so K/V are never repeated.
Causal masks are bottom-right aligned (FlashAttention >= 2.1): query i sees key j iff
j <= i + (M - N); rows that see no key give a zero output and lse = -inf.

Equivalent PyTorch: `flash_reference.flash_attention_reference` (re-exported here).

The kernels are written against Triton 3.6 and stay runnable under TRITON_INTERPRET=1 on CPU
tensors, which is how CI covers them.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .flash_reference import flash_attention_reference

__all__ = [
    "DEFAULT_CONFIG",
    "HEAD_SIZES",
    "SUPPORTED_DTYPES",
    "flash_attention",
    "flash_attention_reference",
]

NAME = "TRITON_FLASH_ATTN"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_SIZES = tuple(range(32, 257, 8))
LOG2E = 1.4426950408889634

# Small blocks for when the caller passes no config: about 64 KiB of shared memory at D=256 in
# 16 bits (twice that in float32), slow but safe. Measured per-arch configs live in
# attnrt.platforms.<platform>.triton_flash_configs; the backend passes them as `config=`
# (this module imports nothing else from attnrt).
DEFAULT_CONFIG: dict[str, dict[str, int]] = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    "bwd_dkdv": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    "bwd_dq": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
}
_BLOCK_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_FWD_SWITCHES = ("warp_specialize", "tma")


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here, so tests can poison it with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- device code


@triton.jit
def _tile_ptrs(base, stride_r, stride_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    return base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d


@triton.jit
def _load_tile(ptrs, row0, n_rows, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    # Masks only where needed: the padded head dimension and, on tail blocks, the rows.
    rows = row0 + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _store_tile(ptrs, val, row0, n_rows, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    tl.store(ptrs, val, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _causal_bounds(start_m, N, M, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Key range of a query block: [0, full) needs no mask, [full, hi) is masked."""
    if CAUSAL:
        off = M - N
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + off, 0), M)
        full = tl.minimum(tl.maximum(start_m + off + 1, 0), M)
    else:
        hi = M
        full = M
    return (full // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, hi, offs_m, N, M, qk_scale, skn, svn,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
               WARP_SPEC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs += tl.cast(lo, tl.int64) * skn
    v_ptrs += tl.cast(lo, tl.int64) * svn
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        k = _load_tile(k_ptrs, start_n, M, BLOCK_N, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if MASKED:
            cols = start_n + offs_n
            keep = cols[None, :] < M
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + (M - N))
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # Rows that have seen no key yet keep m = -inf; subtract 0 instead to avoid NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_sub[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs, start_n, M, BLOCK_N, HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
        k_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn
    return acc, l_i, m_i


@triton.jit
def _online_softmax(qk, m_i, l_i, qk_scale):
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, row0, col, hi, qk_scale,
                   BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """The unmasked loop with K/V tiles fetched by the Hopper bulk tensor copy (TMA)."""
    for start_n in range(0, hi, BLOCK_N):
        k = k_desc.load([row0 + start_n, col])
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, qk_scale)
        v = v_desc.load([row0 + start_n, col])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["N", "M"])
def _fwd_kernel(Q, K, V, OUT, LSE, K_DESC, V_DESC,
                sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sob, son, soh, sod,
                N, M, H, GROUP, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                WARP_SPEC: tl.constexpr, USE_TMA: tl.constexpr):
    # Heaviest causal blocks first, so the short ones fill the tail of the grid.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_ptrs = _tile_ptrs(Q + b * sqb + h * sqh + start_m.to(tl.int64) * sqn, sqn, sqd,
                        BLOCK_M, BLOCK_D)
    q = _load_tile(q_ptrs, start_m, N, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    k_ptrs = _tile_ptrs(K + b * skb + hk * skh, skn, skd, BLOCK_N, BLOCK_D)
    v_ptrs = _tile_ptrs(V + b * svb + hk * svh, svn, svd, BLOCK_N, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full, hi = _causal_bounds(start_m, N, M, CAUSAL, BLOCK_M, BLOCK_N)
    if USE_TMA:
        # K/V viewed as 2D [B * M, Hkv * D]; the host checked that the strides allow it.
        acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, K_DESC, V_DESC, (bh // H) * M,
                                       (h // GROUP).to(tl.int32) * HEAD_DIM, full, qk_scale,
                                       BLOCK_N, PREC)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, full, offs_m, N, M,
                                   qk_scale, skn, svn, BLOCK_N, HEAD_DIM, BLOCK_D, False, CAUSAL,
                                   PREC, WARP_SPEC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, full, hi, offs_m, N, M,
                               qk_scale, skn, svn, BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, PREC,
                               False)
    o_ptrs = _tile_ptrs(OUT + b * sob + h * soh + start_m.to(tl.int64) * son, son, sod,
                        BLOCK_M, BLOCK_D)
    _fwd_epilogue(o_ptrs, LSE + bh.to(tl.int64) * N, acc, l_i, m_i, start_m, N, BLOCK_M,
                  HEAD_DIM, BLOCK_D)


@triton.jit
def _fwd_epilogue(o_ptrs, lse_ptr, acc, l_i, m_i, start_m, N, BLOCK_M: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # l == 0 only for a row that saw no key: its output is 0 and its lse -inf, not NaN.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tl.store(lse_ptr + offs_m, lse, mask=offs_m < N)
    out = acc / l_safe[:, None]
    _store_tile(o_ptrs, out.to(o_ptrs.dtype.element_ty), start_m, N, BLOCK_M, HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=["N"])
def _bwd_delta_kernel(OUT, DO, DELTA, sob, son, soh, sod, sdb, sdn, sdh, sdd, N, H,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O, the row term of the softmax gradient."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row = start_m.to(tl.int64)
    o = _load_tile(_tile_ptrs(OUT + b * sob + h * soh + row * son, son, sod, BLOCK_M, BLOCK_D),
                   start_m, N, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(_tile_ptrs(DO + b * sdb + h * sdh + row * sdn, sdn, sdd, BLOCK_M, BLOCK_D),
                    start_m, N, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _load_row_stats(LSE, DELTA, offs_m, N):
    # lse = -inf (a row that saw no key) becomes +inf so that exp2(s - lse) = 0, not NaN;
    # rows past N get +inf too, so tail blocks need no further mask.
    lse = tl.load(LSE + offs_m, mask=offs_m < N, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m, mask=offs_m < N, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE, DELTA, lo, hi, offs_n, N, M, qk_scale,
                sqn, sdn, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                MASKED: tl.constexpr, PREC: tl.constexpr):
    q_ptrs += tl.cast(lo, tl.int64) * sqn
    do_ptrs += tl.cast(lo, tl.int64) * sdn
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_ptrs, start_m, N, BLOCK_M, HEAD_DIM, BLOCK_D, True)
        lse, delta = _load_row_stats(LSE, DELTA, offs_m, N)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        if MASKED:
            s_t = tl.where(offs_n[:, None] <= offs_m[None, :] + (M - N), s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        do = _load_tile(do_ptrs, start_m, N, BLOCK_M, HEAD_DIM, BLOCK_D, True)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
        q_ptrs += BLOCK_M * sqn
        do_ptrs += BLOCK_M * sdn
    return dk, dv


@triton.jit
def _dkdv_q_range(start_n, N, M, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Query blocks that see a key block: [lo, mid) partly masked, [mid, end) unmasked."""
    end = tl.cdiv(N, BLOCK_M) * BLOCK_M
    if CAUSAL:
        off = M - N
        lo = (tl.minimum(tl.maximum(start_n - off, 0), end) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - off, 0), end), BLOCK_M)
        return lo, mid * BLOCK_M, end
    return 0, 0, end


@triton.jit(do_not_specialize=["N", "M"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
                     sdb, sdn, sdh, sdd, sdkb, sdkn, sdkh, sdkd, sdvb, sdvn, sdvh, sdvd,
                     N, M, H, HKV, GROUP, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    # One program owns a key block of one kv head and loops over the GROUP query heads that
    # read it: dK/dV are summed in registers, so no atomics and a deterministic result.
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    row = start_n.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(_tile_ptrs(K + b * skb + hk.to(tl.int64) * skh + row * skn, skn, skd,
                              BLOCK_N, BLOCK_D), start_n, M, BLOCK_N, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(_tile_ptrs(V + b * svb + hk.to(tl.int64) * svh + row * svn, svn, svd,
                              BLOCK_N, BLOCK_D), start_n, M, BLOCK_N, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, mid, end = _dkdv_q_range(start_n, N, M, CAUSAL, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        h = (hk * GROUP + g).to(tl.int64)
        q_ptrs = _tile_ptrs(Q + b * sqb + h * sqh, sqn, sqd, BLOCK_M, BLOCK_D)
        do_ptrs = _tile_ptrs(DO + b * sdb + h * sdh, sdn, sdd, BLOCK_M, BLOCK_D)
        stats = (b * H + h) * N
        if CAUSAL:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE + stats, DELTA + stats, lo,
                                 mid, offs_n, N, M, qk_scale, sqn, sdn, BLOCK_M, HEAD_DIM,
                                 BLOCK_D, True, PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE + stats, DELTA + stats, mid, end,
                             offs_n, N, M, qk_scale, sqn, sdn, BLOCK_M, HEAD_DIM, BLOCK_D, False,
                             PREC)
    dk_ptrs = _tile_ptrs(DK + b * sdkb + hk.to(tl.int64) * sdkh + row * sdkn, sdkn, sdkd,
                         BLOCK_N, BLOCK_D)
    dv_ptrs = _tile_ptrs(DV + b * sdvb + hk.to(tl.int64) * sdvh + row * sdvn, sdvn, sdvd,
                         BLOCK_N, BLOCK_D)
    _store_tile(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), start_n, M, BLOCK_N, HEAD_DIM,
                BLOCK_D)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), start_n, M, BLOCK_N, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, lo, hi, offs_m, N, M, qk_scale, skn, svn,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs += tl.cast(lo, tl.int64) * skn
    v_ptrs += tl.cast(lo, tl.int64) * svn
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_tile(k_ptrs, start_n, M, BLOCK_N, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if MASKED:
            cols = start_n + offs_n
            keep = cols[None, :] < M
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + (M - N))
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        v = _load_tile(v_ptrs, start_n, M, BLOCK_N, HEAD_DIM, BLOCK_D, MASKED)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
        k_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn
    return dq


@triton.jit(do_not_specialize=["N", "M"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
                   sdb, sdn, sdh, sdd, sdqb, sdqn, sdqh, sdqd,
                   N, M, H, GROUP, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    row = start_m.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(_tile_ptrs(Q + b * sqb + h * sqh + row * sqn, sqn, sqd, BLOCK_M, BLOCK_D),
                   start_m, N, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(_tile_ptrs(DO + b * sdb + h * sdh + row * sdn, sdn, sdd, BLOCK_M, BLOCK_D),
                    start_m, N, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    lse, delta = _load_row_stats(LSE + bh.to(tl.int64) * N, DELTA + bh.to(tl.int64) * N,
                                 offs_m, N)
    k_ptrs = _tile_ptrs(K + b * skb + hk * skh, skn, skd, BLOCK_N, BLOCK_D)
    v_ptrs = _tile_ptrs(V + b * svb + hk * svh, svn, svd, BLOCK_N, BLOCK_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full, hi = _causal_bounds(start_m, N, M, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, 0, full, offs_m, N, M, qk_scale, skn,
                   svn, BLOCK_N, HEAD_DIM, BLOCK_D, False, CAUSAL, PREC)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, full, hi, offs_m, N, M, qk_scale, skn,
                   svn, BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, PREC)
    dq_ptrs = _tile_ptrs(DQ + b * sdqb + h * sdqh + row * sdqn, sdqn, sdqd, BLOCK_M, BLOCK_D)
    _store_tile(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), start_m, N, BLOCK_M, HEAD_DIM,
                BLOCK_D)


# ----------------------------------------------------------------------------- host code


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}={type(t).__name__} is not supported by {NAME}; expected a "
                        "torch.Tensor")
    if t.dim() != 4:
        raise ValueError(f"{name}.ndim={t.dim()} is not supported by {NAME}; expected 4 "
                         f"({'[B, N, H, D]' if name == 'q' else '[B, M, Hkv, D]'})")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}.dtype={t.dtype} is not supported by {NAME}; supported: "
                        "float16, bfloat16, float32")
    if 0 in t.shape:
        raise ValueError(f"{name}.shape={tuple(t.shape)} is not supported by {NAME}; every "
                         "dimension must be at least 1")
    return t


def _check_device(q: torch.Tensor) -> None:
    if q.device.type == "cuda":
        return
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(f"q.device={q.device} is not supported by {NAME}; supported: cuda, or cpu "
                     "with TRITON_INTERPRET=1 set before triton is imported")


def _check_pair(q: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.dtype != q.dtype:
        raise TypeError(f"{name}.dtype={t.dtype} is not supported by {NAME}; it must equal "
                        f"q.dtype={q.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name}.device={t.device} is not supported by {NAME}; it must equal "
                         f"q.device={q.device}")
    if t.shape[0] != q.shape[0] or t.shape[3] != q.shape[3]:
        raise ValueError(f"{name}.shape={tuple(t.shape)} is not supported by {NAME}; batch and "
                         f"head size must match q.shape={tuple(q.shape)}")


def _check_inputs(q: object, k: object, v: object, softmax_scale: object) -> None:
    q, k, v = _check_tensor("q", q), _check_tensor("k", k), _check_tensor("v", v)
    _check_device(q)
    _check_pair(q, "k", k)
    _check_pair(q, "v", v)
    if v.shape != k.shape:
        raise ValueError(f"v.shape={tuple(v.shape)} is not supported by {NAME}; it must equal "
                         f"k.shape={tuple(k.shape)}")
    if q.shape[3] not in HEAD_SIZES:
        raise ValueError(f"head_size={q.shape[3]} is not supported by {NAME}; supported: "
                         "multiples of 8 from 32 to 256")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"num_kv_heads={k.shape[2]} is not supported by {NAME} with "
                         f"num_heads={q.shape[2]}; num_heads must be a multiple of num_kv_heads")
    if softmax_scale is not None and not (
        isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
        and softmax_scale > 0
    ):
        raise ValueError(f"softmax_scale={softmax_scale!r} is not supported by {NAME}; "
                         "expected None or a finite number > 0")


def _valid_entry(entry: dict) -> bool:
    # Optional 0/1 switches, read by the forward kernel only.
    if set(entry) - set(_FWD_SWITCHES) != set(_BLOCK_KEYS) or not all(
        isinstance(x, int) for x in entry.values()
    ):
        return False
    if any(entry.get(key, 0) not in (0, 1) for key in _FWD_SWITCHES):
        return False
    pow2 = [entry[key] for key in ("BLOCK_M", "BLOCK_N", "num_warps")]
    # tl.dot needs every block dimension to be at least 16.
    return all(x >= 1 and x & (x - 1) == 0 for x in pow2) and min(pow2[:2]) >= 16 and (
        entry["num_stages"] >= 1)


def _resolve_config(config: dict | None) -> dict[str, dict[str, int]]:
    """DEFAULT_CONFIG with the caller's per-kernel entries laid over it."""
    if config is None:
        return DEFAULT_CONFIG
    if not isinstance(config, dict) or not set(config) <= set(DEFAULT_CONFIG):
        raise ValueError(f"config={config!r} is not supported by {NAME}; expected a dict with "
                         f"keys among {sorted(DEFAULT_CONFIG)}")
    merged = {}
    for kernel, base in DEFAULT_CONFIG.items():
        entry = {**base, **config.get(kernel, {})}
        if not _valid_entry(entry):
            raise ValueError(f"config[{kernel!r}]={config.get(kernel)!r} is not supported by "
                             f"{NAME}; expected BLOCK_M, BLOCK_N >= 16 and num_warps as powers "
                             "of two, num_stages >= 1, and no other keys")
        merged[kernel] = entry
    return merged


def _tma_ok(t: torch.Tensor) -> bool:
    """True where [B, M, Hkv, D] can be read as a 2D [B * M, Hkv * D] TMA tensor."""
    b, m, hkv, d = t.shape
    return (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9
            and d == triton.next_power_of_2(d) and t.stride(3) == 1 and t.stride(2) == d
            and (b == 1 or t.stride(0) == m * t.stride(1)) and t.data_ptr() % 16 == 0
            and t.stride(1) * t.element_size() % 16 == 0)


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, cfg: dict[str, int]) -> tuple | None:
    if not (cfg.get("tma", 0) and _tma_ok(k) and _tma_ok(v)):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, m, hkv, d = k.shape
    return tuple(TensorDescriptor(t, [b * m, hkv * d], [t.stride(1), 1], [cfg["BLOCK_N"], d])
                 for t in (k, v))


def _launch_args(cfg: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    blocks = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
    return blocks, {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _consts(q: torch.Tensor, causal: bool) -> dict:
    d = q.shape[3]
    # float32 dots must not drop to tf32, or they miss the float32 accuracy the tests demand.
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return {"HEAD_DIM": d, "BLOCK_D": triton.next_power_of_2(d), "CAUSAL": causal, "PREC": prec}


def _forward(q, k, v, causal, scale, cfg):
    b, n, h, _ = q.shape
    m, hkv = k.shape[1], k.shape[2]
    out = _alloc(tuple(q.shape), q.dtype, q.device)
    lse = _alloc((b, h, n), torch.float32, q.device)
    blocks, launch = _launch_args(cfg["fwd"])
    grid = (triton.cdiv(n, blocks["BLOCK_M"]), b * h)
    descs = _kv_descriptors(k, v, cfg["fwd"])
    _fwd_kernel[grid](q, k, v, out, lse, *(descs or (k, v)), *q.stride(), *k.stride(), *v.stride(),
                      *out.stride(),
                      n, m, h, h // hkv, scale * LOG2E, **_consts(q, causal), **blocks, **launch,
                      WARP_SPEC=bool(cfg["fwd"].get("warp_specialize", 0)),
                      USE_TMA=descs is not None)
    return out, lse


def _backward_delta(out, dout, dlse):
    b, n, h, _ = out.shape
    delta = _alloc((b, h, n), torch.float32, out.device)
    block_m = 64
    grid = (triton.cdiv(n, block_m), b * h)
    d = out.shape[3]
    _bwd_delta_kernel[grid](out, dout, delta, *out.stride(), *dout.stride(), n, h, HEAD_DIM=d,
                            BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_m, num_warps=4)
    # d lse / d s = softmax row, so an lse gradient folds into delta: ds = p * (dp - delta + dlse).
    return delta if dlse is None else delta - dlse.float()


def _launch_dkdv(q, k, v, dout, lse, delta, causal, scale, cfg):
    b, n, h, _ = q.shape
    m, hkv = k.shape[1], k.shape[2]
    dk = _alloc(tuple(k.shape), k.dtype, k.device)
    dv = _alloc(tuple(v.shape), v.dtype, v.device)
    blocks, launch = _launch_args(cfg)
    grid = (triton.cdiv(m, blocks["BLOCK_N"]), b * hkv)
    _bwd_dkdv_kernel[grid](q, k, v, dout, lse, delta, dk, dv, *q.stride(), *k.stride(),
                           *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), n, m, h, hkv,
                           h // hkv, scale * LOG2E, scale, **_consts(q, causal), **blocks,
                           **launch)
    return dk, dv


def _launch_dq(q, k, v, dout, lse, delta, causal, scale, cfg):
    b, n, h, _ = q.shape
    m, hkv = k.shape[1], k.shape[2]
    dq = _alloc(tuple(q.shape), q.dtype, q.device)
    blocks, launch = _launch_args(cfg)
    grid = (triton.cdiv(n, blocks["BLOCK_M"]), b * h)
    _bwd_dq_kernel[grid](q, k, v, dout, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(),
                         *dout.stride(), *dq.stride(), n, m, h, h // hkv, scale * LOG2E, scale,
                         **_consts(q, causal), **blocks, **launch)
    return dq


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    delta = _backward_delta(out, dout, dlse)
    args = (q, k, v, dout, lse, delta, ctx.causal, ctx.scale)
    dk, dv = _launch_dkdv(*args, ctx.cfg["bwd_dkdv"])
    dq = _launch_dq(*args, ctx.cfg["bwd_dq"])
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, cfg):
        out, lse = _forward(q, k, v, causal, scale, cfg)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.cfg = causal, scale, cfg
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv = _backward(ctx, dout, dlse)
        return dq, dk, dv, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    config: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, N, H, D] over k, v [B, M, Hkv, D], H % Hkv == 0 (GQA/MQA).

    Returns out [B, N, H, D] in q's dtype and, with return_lse, also lse [B, H, N] float32
    (natural-log log-sum-exp of the scaled scores; -inf for a causal row that sees no key).
    Differentiable in q, k, v (and through lse); dK/dV are summed over the heads sharing them.
    softmax_scale defaults to 1/sqrt(D). Causal masks are bottom-right aligned. `config` may
    override {"fwd" | "bwd_dkdv" | "bwd_dq": {BLOCK_M, BLOCK_N, num_warps, num_stages}}; see
    attnrt.platforms.cuda.triton_flash_configs for measured per-arch values.

    Equivalent PyTorch: flash_attention_reference(q, k, v, causal, softmax_scale, return_lse).
    """
    _check_inputs(q, k, v, softmax_scale)
    cfg = _resolve_config(config)
    scale = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else float(softmax_scale)
    out, lse = _FlashAttention.apply(q, k, v, bool(causal), scale, cfg)
    return (out, lse) if return_lse else out
