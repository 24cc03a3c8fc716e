"""Device code of the block-sparse flash kernel (host side: launch.py). Built from the
TRITON_FLASH_ATTN family (online softmax in base 2, lse out, deterministic backward), with the
key loop driven by per-query-block lists instead of a range.

Shapes: q/out/dout [B, N, H, D], k/v [B, M, Hkv, D]; IDX [B, H, NQB, MAXK], CNT [B, H, NQB]
(any strides, expanded views included); VALID [NKB]; LSE [B, H, N]; LSE2/DELTA [B, H, NP] with
NP = NQB * BLOCK_Q (padding rows: LSE2 = +inf, DELTA = 0); K2Q [B, H, NKB, NQB] and K2Q_CNT
[B, H, NKB] (contiguous): the query blocks that visit each key block. With HAS_ROW_MASK:
RMASK int64 [B, H, NQB, MAXK] aligned with IDX (bit r: row r of the query block attends that
entry's key block), and for dK/dV DENSE int64 [B, H, NQB, NKB], the same words by key block id.

Tiling (attnrt.kernels.block_sparse.options): STEP list entries are gathered into one tile per
inner step (key blocks for fwd/dq, query blocks for dkdv); TILE_Q / TILE_K cut a program's own
block into row tiles, one program each; dK/dV's ROWS cut each visiting query block into steps
of ROWS rows.
"""

import triton
import triton.language as tl

from ..flash.jit import _fwd_epilogue, _load_tile, _row_ptrs, _store_tile


@triton.jit
def _listed_rows(idx_row, t, stride_t, count, VALID, M, HAS_VALID: tl.constexpr,
                 BLOCK: tl.constexpr, STEP: tl.constexpr):
    """Rows [STEP * BLOCK] of the STEP blocks listed at idx_row from entry t, and which of
    them hold a valid token (entries past count and rows past a block's valid count do not).
    One block a step reads its entry as a scalar: its rows are then provably contiguous, which
    the H100 ran 15% faster than the gathered form (bench/NOTES-sparse.md, run 3)."""
    # One return statement: Triton 3.6 types every return of a function, pruned or not.
    if STEP == 1:
        start = tl.load(idx_row + t * stride_t) * BLOCK
        within = tl.arange(0, BLOCK)
        n_valid = tl.load(VALID + start // BLOCK) if HAS_VALID else tl.minimum(BLOCK, M - start)
        ok = within < n_valid
    else:
        cols = tl.arange(0, STEP * BLOCK)
        j = t + cols // BLOCK
        listed = j < count
        start = tl.load(idx_row + j * stride_t, mask=listed, other=0) * BLOCK
        within = cols % BLOCK
        if HAS_VALID:
            n_valid = tl.load(VALID + start // BLOCK, mask=listed, other=0)
        else:
            n_valid = tl.minimum(BLOCK, M - start)
        ok = listed & (within < n_valid)
    return start + within, ok


@triton.jit
def _gather(base, rows, ok, stride_r, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            INT64: tl.constexpr):
    """[len(rows), BLOCK_D] tile of the given rows; rows not ok and padded columns read 0."""
    ptrs = _row_ptrs(base, rows, stride_r, stride_d, BLOCK_D, INT64)
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs, mask=ok[:, None], other=0.0)
    cols = tl.arange(0, BLOCK_D)
    return tl.load(ptrs, mask=ok[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _sub_tile(pid, BLOCK_Q: tl.constexpr, TILE_Q: tl.constexpr):
    """(block, first row) of this program: blocks of BLOCK_Q rows cut into tiles of TILE_Q."""
    qb = pid // (BLOCK_Q // TILE_Q)
    return qb, qb * BLOCK_Q + (pid % (BLOCK_Q // TILE_Q)) * TILE_Q


@triton.jit
def _row_bits(mask_row, t, stride_t, count, first_bit, TILE_Q: tl.constexpr,
              BLOCK: tl.constexpr, STEP: tl.constexpr):
    """Which of the TILE_Q rows (bits first_bit + r of each word) attend the STEP list entries
    from t: [TILE_Q, 1] for one entry a step, [TILE_Q, STEP * BLOCK] (one column per key row)
    for gathered steps; entries past count read 0."""
    bit = first_bit + tl.arange(0, TILE_Q)
    if STEP == 1:
        word = tl.load(mask_row + t * stride_t)
        bits = ((word >> bit) & 1)[:, None] != 0
    else:
        j = t + tl.arange(0, STEP * BLOCK) // BLOCK
        words = tl.load(mask_row + j * stride_t, mask=j < count, other=0)
        bits = ((words[None, :] >> bit[:, None]) & 1) != 0
    return bits


@triton.jit(do_not_specialize=["N", "M"])
def _fwd_kernel(Q, K, V, OUT, LSE, IDX, CNT, VALID, RMASK, sq, sk, sv, so, si, sc, sr, N, M, H,
                GROUP, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HAS_VALID: tl.constexpr,
                PREC: tl.constexpr, INT64: tl.constexpr, STEP: tl.constexpr,
                TILE_Q: tl.constexpr, HAS_ROW_MASK: tl.constexpr = False):
    """One program per (TILE_Q rows of a query block, batch * head): online softmax over its
    listed key blocks, STEP of them gathered into one [STEP * BLOCK_K, D] tile per step; with
    HAS_ROW_MASK, a row whose bit is clear sees the entry's keys as -inf."""
    qb, start_m = _sub_tile(tl.program_id(0), BLOCK_Q, TILE_Q)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, TILE_Q)
    q = _load_tile(_row_ptrs(Q + b * sq[0] + h * sq[2], offs_m, sq[1], sq[3], BLOCK_D, INT64),
                   start_m, N, TILE_Q, HEAD_DIM, BLOCK_D, True)
    k_h = K + b * sk[0] + hk * sk[2]
    v_h = V + b * sv[0] + hk * sv[2]
    idx_row = IDX + b * si[0] + h * si[1] + qb * si[2]
    count = tl.load(CNT + b * sc[0] + h * sc[1] + qb * sc[2])
    acc = tl.zeros([TILE_Q, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([TILE_Q], dtype=tl.float32)
    m_i = tl.full([TILE_Q], float("-inf"), dtype=tl.float32)
    for t in tl.range(0, count, STEP):
        rows, ok = _listed_rows(idx_row, t, si[3], count, VALID, M, HAS_VALID, BLOCK_K, STEP)
        k = _gather(k_h, rows, ok, sk[1], sk[3], HEAD_DIM, BLOCK_D, INT64)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        keep = ok[None, :]
        if HAS_ROW_MASK:
            keep = keep & _row_bits(RMASK + b * sr[0] + h * sr[1] + qb * sr[2], t, sr[3],
                                    count, start_m - qb * BLOCK_Q, TILE_Q, BLOCK_K, STEP)
        s = tl.where(keep, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no valid key keeps m = -inf; subtract 0 instead to avoid NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _gather(v_h, rows, ok, sv[1], sv[3], HEAD_DIM, BLOCK_D, INT64)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    o_ptrs = _row_ptrs(OUT + b * so[0] + h * so[2], offs_m, so[1], so[3], BLOCK_D, INT64)
    _fwd_epilogue(o_ptrs, LSE + bh.to(tl.int64) * N, acc, l_i, m_i, start_m, N, TILE_Q,
                  HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=["N", "M", "NP"])
def _dq_kernel(Q, K, V, DO, DQ, LSE2, DELTA, IDX, CNT, VALID, RMASK, sq, sk, sv, sdo, sdq, si,
               sc, sr, N, M, NP, H, GROUP, qk_scale, sm_scale, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
               HAS_VALID: tl.constexpr, PREC: tl.constexpr, INT64: tl.constexpr,
               STEP: tl.constexpr, TILE_Q: tl.constexpr, HAS_ROW_MASK: tl.constexpr = False):
    """dQ of TILE_Q rows of one query block over its own list (STEP key blocks a step): no
    atomics, deterministic."""
    qb, start_m = _sub_tile(tl.program_id(0), BLOCK_Q, TILE_Q)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, TILE_Q)
    q = _load_tile(_row_ptrs(Q + b * sq[0] + h * sq[2], offs_m, sq[1], sq[3], BLOCK_D, INT64),
                   start_m, N, TILE_Q, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(_row_ptrs(DO + b * sdo[0] + h * sdo[2], offs_m, sdo[1], sdo[3], BLOCK_D,
                              INT64), start_m, N, TILE_Q, HEAD_DIM, BLOCK_D, True)
    stats = bh.to(tl.int64) * NP + offs_m
    lse2 = tl.load(LSE2 + stats)
    delta = tl.load(DELTA + stats)
    k_h = K + b * sk[0] + hk * sk[2]
    v_h = V + b * sv[0] + hk * sv[2]
    idx_row = IDX + b * si[0] + h * si[1] + qb * si[2]
    count = tl.load(CNT + b * sc[0] + h * sc[1] + qb * sc[2])
    dq = tl.zeros([TILE_Q, BLOCK_D], dtype=tl.float32)
    for t in tl.range(0, count, STEP):
        rows, ok = _listed_rows(idx_row, t, si[3], count, VALID, M, HAS_VALID, BLOCK_K, STEP)
        k = _gather(k_h, rows, ok, sk[1], sk[3], HEAD_DIM, BLOCK_D, INT64)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        keep = ok[None, :]
        if HAS_ROW_MASK:
            keep = keep & _row_bits(RMASK + b * sr[0] + h * sr[1] + qb * sr[2], t, sr[3],
                                    count, start_m - qb * BLOCK_Q, TILE_Q, BLOCK_K, STEP)
        p = tl.where(keep, p, 0.0)
        v = _gather(v_h, rows, ok, sv[1], sv[3], HEAD_DIM, BLOCK_D, INT64)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    dq_ptrs = _row_ptrs(DQ + b * sdq[0] + h * sdq[2], offs_m, sdq[1], sdq[3], BLOCK_D, INT64)
    _store_tile(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), start_m, N, TILE_Q, HEAD_DIM,
                BLOCK_D)


@triton.jit
def _query_bits(dense_col, s_qb, list_row, t, rows, ok, BLOCK_Q: tl.constexpr,
                STEP: tl.constexpr):
    """Whether each of the STEP * BLOCK_Q query rows listed from entry t attends this key
    block ([STEP * BLOCK_Q] bool): bit (row % BLOCK_Q) of the word of its query block, read
    from the dense [NQB] column of words at dense_col (stride s_qb)."""
    if STEP == 1:
        word = tl.load(dense_col + tl.load(list_row + t) * s_qb)
        bits = ((word >> tl.arange(0, BLOCK_Q)) & 1) != 0
    else:
        words = tl.load(dense_col + (rows // BLOCK_Q) * s_qb, mask=ok, other=0)
        bits = ((words >> (rows % BLOCK_Q)) & 1) != 0
    return bits


@triton.jit
def _dkdv_rows(list_row, t, count, N, BLOCK_Q: tl.constexpr, STEP: tl.constexpr,
               ROWS: tl.constexpr):
    """Query rows of dK/dV's step t and which are real: STEP listed blocks from entry t, or,
    with ROWS < BLOCK_Q (STEP == 1), part t % (BLOCK_Q // ROWS) of entry t // (BLOCK_Q //
    ROWS): ROWS contiguous rows."""
    if ROWS == BLOCK_Q:
        rows, ok = _listed_rows(list_row, t, 1, count, list_row, N, False, BLOCK_Q, STEP)
    else:
        first = (tl.load(list_row + t // (BLOCK_Q // ROWS)) * BLOCK_Q
                 + (t % (BLOCK_Q // ROWS)) * ROWS)
        rows = first + tl.arange(0, ROWS)
        ok = rows < N
    return rows, ok


@triton.jit
def _dkdv_step(dk, dv, k, v, q_h, do_h, lse2_h, delta_h, list_row, t, count, key_ok, N,
               qk_scale, sq, sdo, dense_col, s_qb, BLOCK_Q: tl.constexpr, STEP: tl.constexpr,
               ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               PREC: tl.constexpr, INT64: tl.constexpr, HAS_ROW_MASK: tl.constexpr):
    # The rows of step t (_dkdv_rows). Rows past N or past count load as zeros with
    # lse2 = +inf, so p = 0 there; key rows past the block's valid count are zeroed by key_ok.
    rows, ok = _dkdv_rows(list_row, t, count, N, BLOCK_Q, STEP, ROWS)
    q = _gather(q_h, rows, ok, sq[1], sq[3], HEAD_DIM, BLOCK_D, INT64)
    lse2 = tl.load(lse2_h + rows, mask=ok, other=float("inf"))
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC)
    keep = key_ok[:, None]
    if HAS_ROW_MASK:
        # Sub-steps read their rows' bits in the general (gathered) form.
        bits = _query_bits(dense_col, s_qb, list_row, t, rows, ok, BLOCK_Q,
                           STEP if ROWS == BLOCK_Q else 2)
        keep = keep & bits[None, :]
    p_t = tl.where(keep, tl.math.exp2(s_t * qk_scale - lse2[None, :]), 0.0)
    do = _gather(do_h, rows, ok, sdo[1], sdo[3], HEAD_DIM, BLOCK_D, INT64)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
    delta = tl.load(delta_h + rows, mask=ok, other=0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk = tl.dot(ds_t, q, dk, input_precision=PREC)
    return dk, dv


@triton.jit(do_not_specialize=["N", "M", "NP"])
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA, K2Q, K2Q_CNT, VALID, DENSE, sq, sk, sv, sdo,
                 sdk, sdv, sd, N, M, NP, H, HKV, GROUP, NQB, NKB, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_K: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr,
                 INT64: tl.constexpr, STEP: tl.constexpr, TILE_K: tl.constexpr,
                 ROWS: tl.constexpr, HAS_ROW_MASK: tl.constexpr = False):
    """One program per (TILE_K rows of a key block, batch * kv head): sums dK/dV in registers
    over the GROUP query heads and, per head, the query blocks that visit the block (STEP of
    them a step, or ROWS rows of one a step; no atomics). With HAS_ROW_MASK, DENSE
    [B, H, NQB, NKB] (strides sd) holds each (query block, key block) pair's row bits."""
    kb, start_n = _sub_tile(tl.program_id(0), BLOCK_K, TILE_K)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    block_valid = tl.load(VALID + kb) if HAS_VALID else tl.minimum(BLOCK_K, M - kb * BLOCK_K)
    n_valid = block_valid - (start_n - kb * BLOCK_K)
    offs_n = start_n + tl.arange(0, TILE_K)
    key_ok = tl.arange(0, TILE_K) < n_valid
    k = _gather(K + b * sk[0] + hk * sk[2], offs_n, key_ok, sk[1], sk[3], HEAD_DIM, BLOCK_D,
                INT64)
    v = _gather(V + b * sv[0] + hk * sv[2], offs_n, key_ok, sv[1], sv[3], HEAD_DIM, BLOCK_D,
                INT64)
    dk = tl.zeros([TILE_K, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([TILE_K, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        count = tl.load(K2Q_CNT + bh * NKB + kb)
        for t in tl.range(0, count * (BLOCK_Q // ROWS), STEP):
            dk, dv = _dkdv_step(dk, dv, k, v, Q + b * sq[0] + h * sq[2],
                                DO + b * sdo[0] + h * sdo[2], LSE2 + bh * NP, DELTA + bh * NP,
                                K2Q + (bh * NKB + kb) * NQB, t, count, key_ok, N, qk_scale, sq,
                                sdo, DENSE + b * sd[0] + h * sd[1] + kb * sd[3], sd[2],
                                BLOCK_Q, STEP, ROWS, HEAD_DIM, BLOCK_D, PREC, INT64,
                                HAS_ROW_MASK)
    dk_ptrs = _row_ptrs(DK + b * sdk[0] + hk * sdk[2], offs_n, sdk[1], sdk[3], BLOCK_D, INT64)
    dv_ptrs = _row_ptrs(DV + b * sdv[0] + hk * sdv[2], offs_n, sdv[1], sdv[3], BLOCK_D, INT64)
    _store_tile(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), start_n, M, TILE_K, HEAD_DIM,
                BLOCK_D)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), start_n, M, TILE_K, HEAD_DIM, BLOCK_D)


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
