"""Device code of TRITON_FLASH_ATTN: the Triton kernels and their helpers (host side, checks,
configs and autograd live in triton_flash.py). Shapes and conventions: see triton_flash.py.
"""

import triton
import triton.language as tl


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
def _unscaled(strides, UNIT: tl.constexpr):
    """A (batch, row, head, dim) stride tuple whose first three the host divided by UNIT."""
    return strides[0] * UNIT, strides[1] * UNIT, strides[2] * UNIT, strides[3]


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


@triton.jit
def _grouped_program(per_head, HEAD_GROUP):
    """(program within its head, head) of this program of a 1D grid of per_head programs per
    head, program 0 the heaviest when causal. Heads go in groups of HEAD_GROUP; in a group,
    program i of every head runs before program i + 1 of any, so the light programs of many
    heads fill the grid's tail. HEAD_GROUP = 1 runs one head after another
    (attnrt.kernels.flash.launch.head_group picks it)."""
    n_heads = tl.num_programs(0) // per_head
    pid = tl.program_id(0)
    group = pid // (HEAD_GROUP * per_head)
    rank = pid - group * HEAD_GROUP * per_head
    size = tl.minimum(HEAD_GROUP, n_heads - group * HEAD_GROUP)  # the last group may be short
    return rank // size, group * HEAD_GROUP + rank % size


@triton.jit(do_not_specialize=["N", "M", "HEAD_GROUP"])
def _fwd_kernel(Q, K, V, OUT, LSE, K_DESC, V_DESC,
                sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sob, son, soh, sod,
                N, M, H, GROUP, HEAD_GROUP, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                WARP_SPEC: tl.constexpr, USE_TMA: tl.constexpr, UNIT: tl.constexpr = 1):
    # Batch, row and head strides come divided by UNIT (see triton_flash._stride_unit): the
    # product tells Triton they divide by UNIT, so tiles load as 16-byte vectors.
    sqb, sqn, sqh = sqb * UNIT, sqn * UNIT, sqh * UNIT
    skb, skn, skh = skb * UNIT, skn * UNIT, skh * UNIT
    svb, svn, svh = svb * UNIT, svn * UNIT, svh * UNIT
    sob, son, soh = sob * UNIT, son * UNIT, soh * UNIT
    i, bh = _grouped_program(tl.cdiv(N, BLOCK_M), HEAD_GROUP)
    start_m = (tl.cdiv(N, BLOCK_M) - 1 - i) * BLOCK_M  # the last rows see the most keys
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


@triton.jit(do_not_specialize=["N", "NP"])
def _bwd_delta_kernel(OUT, DO, LSE, DELTA, LSE2, sob, son, soh, sod, sdb, sdn, sdh, sdd, N, NP, H,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      UNIT: tl.constexpr = 1):
    """Row terms of the backward, [B, H, NP] with NP >= N: delta = sum_d dO * O, and lse in
    log2 units (lse2). Rows N..NP-1 get delta = 0 and lse2 = +inf (so p = 0 there), which lets
    the backward loops read whole blocks of them without masks."""
    sob, son, soh = sob * UNIT, son * UNIT, soh * UNIT
    sdb, sdn, sdh = sdb * UNIT, sdn * UNIT, sdh * UNIT
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
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=float("-inf"))
    # lse = -inf (a row that saw no key, or padding) becomes +inf so that exp2(s - lse2) = 0.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    stats = bh.to(tl.int64) * NP + offs_m
    tl.store(DELTA + stats, delta, mask=offs_m < NP)
    tl.store(LSE2 + stats, lse2, mask=offs_m < NP)


@triton.jit
def _row_ptrs(base, rows, stride_r, stride_d, BLOCK_D: tl.constexpr, INT64: tl.constexpr):
    """Pointers to the given rows of a [rows, D] view, int32 offsets unless INT64.

    Built from the row indices at each use, as FlexAttention's backward does. Both alternatives
    cost: a tile of 64-bit pointers carried through the loop takes two registers per element,
    and adding an int64 block start to int32 in-block offsets made ptxas serialize the wgmmas of
    the loop (C7515: every wgmma waits for the previous one), as does a second pipelined loop
    over the same accumulators. Check with `ptxas -v` after changing these loops.
    """
    if INT64:
        rows = rows.to(tl.int64)
    return base + rows[:, None] * stride_r + tl.arange(0, BLOCK_D)[None, :] * stride_d


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, DQ, LSE2, DELTA, start_m, offs_n, N, M, qk_scale, sm_scale,
               sq, sdo, sdq, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, CAUSAL_MASK: tl.constexpr, PREC: tl.constexpr,
               ATOMIC_DQ: tl.constexpr, INT64: tl.constexpr):
    # No row masks, the tail block of rows past N included: those rows read row N - 1 and have
    # lse2 = +inf (padding), so p = 0 and they add nothing. Without CAUSAL_MASK, no mask at all.
    # Loads sit where FlexAttention's backward puts them: lse before S^T, dO after it, delta
    # after dV.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = tl.minimum(offs_m, N - 1)
    q = _load_tile(_row_ptrs(Q, rows, sq[1], sq[3], BLOCK_D, INT64), start_m, N, BLOCK_M,
                   HEAD_DIM, BLOCK_D, False)
    lse2 = tl.load(LSE2 + offs_m)
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC)
    if CAUSAL_MASK:
        s_t = tl.where(offs_n[:, None] <= offs_m[None, :] + (M - N), s_t, float("-inf"))
    p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
    do = _load_tile(_row_ptrs(DO, rows, sdo[1], sdo[3], BLOCK_D, INT64), start_m, N, BLOCK_M,
                    HEAD_DIM, BLOCK_D, False)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
    delta = tl.load(DELTA + offs_m)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk = tl.dot(ds_t, q, dk, input_precision=PREC)
    if ATOMIC_DQ:
        # Key rows past M were loaded as zeros, so they add nothing to dQ.
        dq = tl.dot(tl.trans(ds_t), k, input_precision=PREC) * sm_scale
        cols = tl.arange(0, BLOCK_D)
        tl.atomic_add(_row_ptrs(DQ, offs_m, sdq[1], sdq[3], BLOCK_D, INT64), dq,
                      mask=(offs_m[:, None] < N) & (cols[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, DQ, LSE2, DELTA, lo, hi, start_n, N, M, qk_scale, sm_scale,
                sq, sdo, sdq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                PEEL: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                INT64: tl.constexpr):
    """dK/dV of key block start_n over the query blocks [lo, hi) of one head. Causal: one loop
    with the mask in every step; with PEEL (causal only), the blocks that cross the diagonal (at
    most cdiv(BLOCK_M + BLOCK_N - 2, BLOCK_M), a constexpr) run first as unrolled masked steps,
    then one unmasked loop. A second *loop* would serialize the wgmmas (C7515, see _row_ptrs)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if CAUSAL and PEEL:
        # The first block with every (row, key) pair visible: start_m + M - N >= the last key.
        diag = start_n + BLOCK_N - 1 - (M - N) - lo
        diag_end = tl.minimum(lo + tl.cdiv(tl.maximum(diag, 0), BLOCK_M) * BLOCK_M, hi)
        for i in tl.static_range((2 * BLOCK_M + BLOCK_N - 3) // BLOCK_M):
            if lo + i * BLOCK_M < diag_end:
                dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, DQ, LSE2, DELTA, lo + i * BLOCK_M,
                                    offs_n, N, M, qk_scale, sm_scale, sq, sdo, sdq, BLOCK_M,
                                    HEAD_DIM, BLOCK_D, True, PREC, ATOMIC_DQ, INT64)
        for start_m in range(diag_end, hi, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, DQ, LSE2, DELTA, start_m, offs_n, N, M,
                                qk_scale, sm_scale, sq, sdo, sdq, BLOCK_M, HEAD_DIM, BLOCK_D,
                                False, PREC, ATOMIC_DQ, INT64)
    else:
        for start_m in range(lo, hi, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, DQ, LSE2, DELTA, start_m, offs_n, N, M,
                                qk_scale, sm_scale, sq, sdo, sdq, BLOCK_M, HEAD_DIM, BLOCK_D,
                                CAUSAL, PREC, ATOMIC_DQ, INT64)
    return dk, dv


@triton.jit
def _dkdv_q_range(start_n, N, M, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query blocks [lo, end) that see a key block."""
    end = tl.cdiv(N, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (tl.minimum(tl.maximum(start_n - (M - N), 0), end) // BLOCK_M) * BLOCK_M
        return lo, end
    return 0, end


@triton.jit
def _dkdv_program(Q, K, V, DO, LSE2, DELTA, DQ, DK, DV, start_n, b, hk, sq, sk, sv, sdo, sdq,
                  sdk, sdv, N, NP, M, H, GROUP, qk_scale, sm_scale, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                  INT64: tl.constexpr, PEEL: tl.constexpr):
    # One program owns a key block of one kv head and loops over the GROUP query heads that
    # read it: dK/dV are summed in registers, so no atomics and a deterministic result.
    # With ATOMIC_DQ it also adds dS^T K into DQ (float32, [B, N, H, D]): 5 products, not 7.
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_h = K + b * sk[0] + hk * sk[2]
    v_h = V + b * sv[0] + hk * sv[2]
    k = _load_tile(_row_ptrs(k_h, offs_n, sk[1], sk[3], BLOCK_D, INT64), start_n, M, BLOCK_N,
                   HEAD_DIM, BLOCK_D, True)
    v = _load_tile(_row_ptrs(v_h, offs_n, sv[1], sv[3], BLOCK_D, INT64), start_n, M, BLOCK_N,
                   HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, end = _dkdv_q_range(start_n, N, M, CAUSAL, BLOCK_M)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_h = Q + b * sq[0] + h * sq[2]
        do_h = DO + b * sdo[0] + h * sdo[2]
        dq_h = DQ + b * sdq[0] + h * sdq[2]
        stats = (b * H + h) * NP
        # One loop, causal mask in every step unless PEEL: a second loop over the diagonal
        # blocks (as in _dq_program) makes ptxas serialize the wgmmas of both (C7515), which
        # costs far more than the compare and select it would save.
        dk, dv = _dkdv_inner(dk, dv, k, v, q_h, do_h, dq_h, LSE2 + stats, DELTA + stats, lo,
                             end, start_n, N, M, qk_scale, sm_scale, sq, sdo, sdq, BLOCK_M,
                             BLOCK_N, HEAD_DIM, BLOCK_D, CAUSAL, PEEL, PREC, ATOMIC_DQ, INT64)
    dk_ptrs = _row_ptrs(DK + b * sdk[0] + hk * sdk[2], offs_n, sdk[1], sdk[3], BLOCK_D, INT64)
    dv_ptrs = _row_ptrs(DV + b * sdv[0] + hk * sdv[2], offs_n, sdv[1], sdv[3], BLOCK_D, INT64)
    _store_tile(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), start_n, M, BLOCK_N, HEAD_DIM,
                BLOCK_D)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), start_n, M, BLOCK_N, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K, V, lo, hi, offs_m, N, M, qk_scale, sk, sv,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
              INT64: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(_row_ptrs(K, cols, sk[1], sk[3], BLOCK_D, INT64), start_n, M, BLOCK_N,
                       HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        if MASKED:
            keep = cols[None, :] < M
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + (M - N))
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        v = _load_tile(_row_ptrs(V, cols, sv[1], sv[3], BLOCK_D, INT64), start_n, M, BLOCK_N,
                       HEAD_DIM, BLOCK_D, MASKED)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _dq_program(Q, K, V, DO, LSE2, DELTA, DQ, start_m, b, h, hk, sq, sk, sv, sdo, sdq, N, NP, M,
                H, qk_scale, sm_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                PREC: tl.constexpr, INT64: tl.constexpr):
    """dQ of one query block: recomputes S and dP from K and V, so no atomics."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_h = Q + b * sq[0] + h * sq[2]
    do_h = DO + b * sdo[0] + h * sdo[2]
    q = _load_tile(_row_ptrs(q_h, offs_m, sq[1], sq[3], BLOCK_D, INT64), start_m, N, BLOCK_M,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_tile(_row_ptrs(do_h, offs_m, sdo[1], sdo[3], BLOCK_D, INT64), start_m, N, BLOCK_M,
                    HEAD_DIM, BLOCK_D, True)
    # Rows past N: lse2 = +inf (padding) makes p = 0, so the loops need no row mask.
    stats = (b * H + h) * NP
    lse2 = tl.load(LSE2 + stats + offs_m)
    delta = tl.load(DELTA + stats + offs_m)
    k_h = K + b * sk[0] + hk * sk[2]
    v_h = V + b * sv[0] + hk * sv[2]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full, hi = _causal_bounds(start_m, N, M, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, k_h, v_h, 0, full, offs_m, N, M, qk_scale, sk, sv,
                   BLOCK_N, HEAD_DIM, BLOCK_D, False, CAUSAL, PREC, INT64)
    dq = _dq_inner(dq, q, do, lse2, delta, k_h, v_h, full, hi, offs_m, N, M, qk_scale, sk, sv,
                   BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, PREC, INT64)
    dq_ptrs = _row_ptrs(DQ + b * sdq[0] + h * sdq[2], offs_m, sdq[1], sdq[3], BLOCK_D, INT64)
    _store_tile(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), start_m, N, BLOCK_M, HEAD_DIM,
                BLOCK_D)


@triton.jit(do_not_specialize=["N", "NP", "M", "HEAD_GROUP"])
def _bwd_kernel(Q, K, V, DO, LSE2, DELTA, DQ, DK, DV, sq, sk, sv, sdo, sdq, sdk, sdv,
                N, NP, M, H, HKV, GROUP, HEAD_GROUP, qk_scale, sm_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M1: tl.constexpr,
                BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
                CAUSAL: tl.constexpr, PREC: tl.constexpr, DKDV: tl.constexpr,
                DQ_PROGRAMS: tl.constexpr, ATOMIC_DQ: tl.constexpr, INT64: tl.constexpr,
                PEEL: tl.constexpr = False, UNIT: tl.constexpr = 1):
    """1D grid of programs per kv head times B * Hkv, kv heads interleaved in groups of
    HEAD_GROUP (_grouped_program); s* are (batch, row, head, dim) stride tuples; LSE2 and DELTA
    are [B, H, NP] (NP >= N, padded, see _bwd_delta_kernel); INT64 where a row offset within
    one (batch, head) overflows int32; PEEL (causal only): dK/dV's diagonal blocks unrolled;
    UNIT: the first three strides of each tuple come divided by it (see _fwd_kernel).

    Per kv head come the dK/dV programs (DKDV: one per BLOCK_N1 keys, the heaviest
    causal block first), then the dQ programs (DQ_PROGRAMS: one per BLOCK_M2 queries of each of
    the GROUP query heads, heaviest first). With both, one launch runs the two kinds side by side
    (as FlexAttention's backward does), so neither leaves a tail of its own.
    """
    sq, sk, sv, sdo = _unscaled(sq, UNIT), _unscaled(sk, UNIT), _unscaled(sv, UNIT), _unscaled(
        sdo, UNIT)
    sdq, sdk, sdv = _unscaled(sdq, UNIT), _unscaled(sdk, UNIT), _unscaled(sdv, UNIT)
    # Constexpr where only one kind is launched, so the other kind is not even compiled.
    n_kv = 0
    per_head = 0
    if DKDV:
        n_kv = tl.cdiv(M, BLOCK_N1)
        per_head += n_kv
    if DQ_PROGRAMS:
        per_head += tl.cdiv(N, BLOCK_M2) * GROUP
    pid, bhk = _grouped_program(per_head, HEAD_GROUP)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    is_dkdv = False
    if DKDV:
        is_dkdv = True
        if DQ_PROGRAMS:
            is_dkdv = pid < n_kv
    if is_dkdv:
        _dkdv_program(Q, K, V, DO, LSE2, DELTA, DQ, DK, DV, pid * BLOCK_N1, b, hk, sq, sk, sv,
                      sdo, sdq, sdk, sdv, N, NP, M, H, GROUP, qk_scale, sm_scale, HEAD_DIM,
                      BLOCK_D, BLOCK_M1, BLOCK_N1, CAUSAL, PREC, ATOMIC_DQ, INT64, PEEL)
    else:
        n_q = tl.cdiv(N, BLOCK_M2)
        j = pid - n_kv
        _dq_program(Q, K, V, DO, LSE2, DELTA, DQ, (n_q - 1 - j % n_q) * BLOCK_M2, b,
                    hk * GROUP + j // n_q, hk, sq, sk, sv, sdo, sdq, N, NP, M, H, qk_scale,
                    sm_scale, HEAD_DIM, BLOCK_D, BLOCK_M2, BLOCK_N2, CAUSAL, PREC, INT64)
