"""Device code of the block-sparse flash kernel (host side: launch.py). Built from the
TRITON_FLASH_ATTN family (online softmax in base 2, lse out, deterministic backward), with the
key loop driven by per-query-block lists instead of a range.

Shapes: q/out/dout [B, N, H, D], k/v [B, M, Hkv, D]; IDX [B, H, NQB, MAXK], CNT [B, H, NQB]
(any strides, expanded views included); VALID [NKB]; LSE [B, H, N]; LSE2/DELTA [B, H, NP] with
NP = NQB * BLOCK_Q (padding rows: LSE2 = +inf, DELTA = 0); K2Q [B, H, NKB, NQB] and K2Q_CNT
[B, H, NKB] (contiguous): the query blocks that visit each key block.
"""

import triton
import triton.language as tl

from ..flash.jit import _fwd_epilogue, _load_tile, _row_ptrs, _store_tile


@triton.jit
def _key_block(idx_row, t, stride_t, VALID, M, HAS_VALID: tl.constexpr, BLOCK_K: tl.constexpr):
    """(first key, valid keys) of the t-th key block listed at idx_row."""
    start_n = tl.load(idx_row + t * stride_t) * BLOCK_K
    n_valid = tl.load(VALID + start_n // BLOCK_K) if HAS_VALID else tl.minimum(BLOCK_K, M - start_n)
    return start_n, n_valid


@triton.jit(do_not_specialize=["N", "M"])
def _fwd_kernel(Q, K, V, OUT, LSE, IDX, CNT, VALID, sq, sk, sv, so, si, sc, N, M, H, GROUP,
                qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HAS_VALID: tl.constexpr,
                PREC: tl.constexpr, INT64: tl.constexpr):
    """One program per (query block, batch * head): online softmax over its listed key blocks."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = qb * BLOCK_Q
    offs_m = start_m + tl.arange(0, BLOCK_Q)
    q = _load_tile(_row_ptrs(Q + b * sq[0] + h * sq[2], offs_m, sq[1], sq[3], BLOCK_D, INT64),
                   start_m, N, BLOCK_Q, HEAD_DIM, BLOCK_D, True)
    k_h = K + b * sk[0] + hk * sk[2]
    v_h = V + b * sv[0] + hk * sv[2]
    idx_row = IDX + b * si[0] + h * si[1] + qb * si[2]
    count = tl.load(CNT + b * sc[0] + h * sc[1] + qb * sc[2])
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    cols = tl.arange(0, BLOCK_K)
    for t in range(count):
        start_n, n_valid = _key_block(idx_row, t, si[3], VALID, M, HAS_VALID, BLOCK_K)
        rows = start_n + cols
        k = _load_tile(_row_ptrs(k_h, rows, sk[1], sk[3], BLOCK_D, INT64), 0, n_valid, BLOCK_K,
                       HEAD_DIM, BLOCK_D, True)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        s = tl.where(cols[None, :] < n_valid, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no valid key keeps m = -inf; subtract 0 instead to avoid NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(_row_ptrs(v_h, rows, sv[1], sv[3], BLOCK_D, INT64), 0, n_valid, BLOCK_K,
                       HEAD_DIM, BLOCK_D, True)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    o_ptrs = _row_ptrs(OUT + b * so[0] + h * so[2], offs_m, so[1], so[3], BLOCK_D, INT64)
    _fwd_epilogue(o_ptrs, LSE + bh.to(tl.int64) * N, acc, l_i, m_i, start_m, N, BLOCK_Q,
                  HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=["N", "M", "NP"])
def _dq_kernel(Q, K, V, DO, DQ, LSE2, DELTA, IDX, CNT, VALID, sq, sk, sv, sdo, sdq, si, sc,
               N, M, NP, H, GROUP, qk_scale, sm_scale, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
               HAS_VALID: tl.constexpr, PREC: tl.constexpr, INT64: tl.constexpr):
    """dQ of one query block over its own list: no atomics, deterministic."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = qb * BLOCK_Q
    offs_m = start_m + tl.arange(0, BLOCK_Q)
    q = _load_tile(_row_ptrs(Q + b * sq[0] + h * sq[2], offs_m, sq[1], sq[3], BLOCK_D, INT64),
                   start_m, N, BLOCK_Q, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(_row_ptrs(DO + b * sdo[0] + h * sdo[2], offs_m, sdo[1], sdo[3], BLOCK_D,
                              INT64), start_m, N, BLOCK_Q, HEAD_DIM, BLOCK_D, True)
    stats = bh.to(tl.int64) * NP + offs_m
    lse2 = tl.load(LSE2 + stats)
    delta = tl.load(DELTA + stats)
    k_h = K + b * sk[0] + hk * sk[2]
    v_h = V + b * sv[0] + hk * sv[2]
    idx_row = IDX + b * si[0] + h * si[1] + qb * si[2]
    count = tl.load(CNT + b * sc[0] + h * sc[1] + qb * sc[2])
    dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_K)
    for t in range(count):
        start_n, n_valid = _key_block(idx_row, t, si[3], VALID, M, HAS_VALID, BLOCK_K)
        rows = start_n + cols
        k = _load_tile(_row_ptrs(k_h, rows, sk[1], sk[3], BLOCK_D, INT64), 0, n_valid, BLOCK_K,
                       HEAD_DIM, BLOCK_D, True)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(cols[None, :] < n_valid, p, 0.0)
        v = _load_tile(_row_ptrs(v_h, rows, sv[1], sv[3], BLOCK_D, INT64), 0, n_valid, BLOCK_K,
                       HEAD_DIM, BLOCK_D, True)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    dq_ptrs = _row_ptrs(DQ + b * sdq[0] + h * sdq[2], offs_m, sdq[1], sdq[3], BLOCK_D, INT64)
    _store_tile(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), start_m, N, BLOCK_Q, HEAD_DIM,
                BLOCK_D)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_h, do_h, lse2_h, delta_h, start_m, key_ok, N, qk_scale, sq, sdo,
               BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               PREC: tl.constexpr, INT64: tl.constexpr):
    # Query rows past N load as zeros and have lse2 = +inf (padding), so p = 0 there; key rows
    # past the block's valid count are zeroed by key_ok.
    offs_m = start_m + tl.arange(0, BLOCK_Q)
    q = _load_tile(_row_ptrs(q_h, offs_m, sq[1], sq[3], BLOCK_D, INT64), start_m, N, BLOCK_Q,
                   HEAD_DIM, BLOCK_D, True)
    lse2 = tl.load(lse2_h + offs_m)
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC)
    p_t = tl.where(key_ok[:, None], tl.math.exp2(s_t * qk_scale - lse2[None, :]), 0.0)
    do = _load_tile(_row_ptrs(do_h, offs_m, sdo[1], sdo[3], BLOCK_D, INT64), start_m, N,
                    BLOCK_Q, HEAD_DIM, BLOCK_D, True)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
    delta = tl.load(delta_h + offs_m)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk = tl.dot(ds_t, q, dk, input_precision=PREC)
    return dk, dv


@triton.jit(do_not_specialize=["N", "M", "NP"])
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA, K2Q, K2Q_CNT, VALID, sq, sk, sv, sdo, sdk,
                 sdv, N, M, NP, H, HKV, GROUP, NQB, NKB, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_K: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr,
                 INT64: tl.constexpr):
    """One program per (key block, batch * kv head): sums dK/dV in registers over the GROUP
    query heads and, per head, the query blocks that visit the block (no atomics)."""
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    start_n = kb * BLOCK_K
    n_valid = tl.load(VALID + kb) if HAS_VALID else tl.minimum(BLOCK_K, M - start_n)
    offs_n = start_n + tl.arange(0, BLOCK_K)
    key_ok = tl.arange(0, BLOCK_K) < n_valid
    k = _load_tile(_row_ptrs(K + b * sk[0] + hk * sk[2], offs_n, sk[1], sk[3], BLOCK_D, INT64),
                   0, n_valid, BLOCK_K, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(_row_ptrs(V + b * sv[0] + hk * sv[2], offs_n, sv[1], sv[3], BLOCK_D, INT64),
                   0, n_valid, BLOCK_K, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        row = (bh * NKB + kb) * NQB
        count = tl.load(K2Q_CNT + bh * NKB + kb)
        q_h = Q + b * sq[0] + h * sq[2]
        do_h = DO + b * sdo[0] + h * sdo[2]
        for t in range(count):
            start_m = tl.load(K2Q + row + t) * BLOCK_Q
            dk, dv = _dkdv_step(dk, dv, k, v, q_h, do_h, LSE2 + bh * NP, DELTA + bh * NP,
                                start_m, key_ok, N, qk_scale, sq, sdo, BLOCK_Q, HEAD_DIM,
                                BLOCK_D, PREC, INT64)
    dk_ptrs = _row_ptrs(DK + b * sdk[0] + hk * sdk[2], offs_n, sdk[1], sdk[3], BLOCK_D, INT64)
    dv_ptrs = _row_ptrs(DV + b * sdv[0] + hk * sdv[2], offs_n, sdv[1], sdv[3], BLOCK_D, INT64)
    _store_tile(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), start_n, M, BLOCK_K, HEAD_DIM,
                BLOCK_D)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), start_n, M, BLOCK_K, HEAD_DIM, BLOCK_D)


@triton.jit
def _compact_kernel(MASK, OUT, CNT, s_group, s_row, s_col, LENGTH, CHUNK: tl.constexpr):
    """Row i of group g of a [G, R, LENGTH] 0/1 int8 view (strides s_group, s_row, s_col):
    writes the column ids of its ones, in increasing order, to OUT[g, i, :] (contiguous
    [G, R, LENGTH], R = the grid's first size) and their number to CNT[g, i]. One program per
    row; how the backward transposes block lists without a host synchronisation."""
    i = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    r = g * tl.num_programs(0) + i
    src = MASK + g * s_group + i * s_row
    base = 0
    for c0 in range(0, LENGTH, CHUNK):
        cols = c0 + tl.arange(0, CHUNK)
        bits = tl.load(src + cols * s_col, mask=cols < LENGTH, other=0).to(tl.int32)
        pos = base + tl.cumsum(bits, 0) - 1
        tl.store(OUT + r * LENGTH + pos, cols, mask=bits != 0)
        base += tl.sum(bits, 0)
    tl.store(CNT + r, base)
