"""The block-sparse forward on Hopper in Gluon: the dense Gluon forward's schedule
(attnrt.kernels.flash.gluon_fwd_sm90) driven by block lists.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size,
NQB = ceil(N / block_q), NKB = ceil(M / block_k), MAXK the length of each block list.

One program takes 128 query rows of one (batch, head), as the dense kernel does:

    producer   a warp per K/V ring: reads the next list entry, then loads that key block's K
               and V tiles (rows key_block * block_k) by TMA into the ring's 2 slots; the first
               producer also loads the two 64-row Q halves once
    consumer   two warpgroups of 64 query rows with the FA3 ping-pong of the dense kernel:
    0 and 1    in its turn a warpgroup issues S_j = Q K_j^T and P_{j-1} V_{j-1}, hands the turn
               over, then runs softmax j while the other one's products run

Two modes, by (block_q, block_k) (MODES):
- shared (128 x 64, 128 x 128): the program is one query block; one producer walks its list
  and both warpgroups read every K/V tile (a slot is refilled once both released it).
- split (64 x 64, VSA's cubes): the program is query blocks 2i and 2i + 1; warpgroup w walks
  the list of block 2i + w through its own ring, fed by its own producer warp. Where the lists
  differ in length, a warpgroup whose partner has finished stops waiting for turns. An odd NQB
  leaves the last program's second warpgroup without a block (count 0).
Scores are masked only in key blocks holding fewer than block_k keys: the tail past M, or
fewer than key_block_valid says (the count is read before the tile's products are issued).

Same contract as launch._forward without row_mask: q [B, N, H, D], k/v [B, M, Hkv, D] (GQA by
head index), block_index int32 [B, H, NQB, MAXK] and block_count int32 [B, H, NQB] (any
strides), key_block_valid int32 [NKB] or None; out [B, N, H, D] and lse [B, H, N] (natural
log; a row that sees no valid key gets out 0 and lse -inf). `usable` says where it runs (else
the Triton kernel serves the same computation). Written against Triton 3.6.

No `from __future__ import annotations` here: Gluon's aggregate checks field annotations as
real types.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.language.core import _aggregate as aggregate

from attnrt.kernels import cdiv
from attnrt.kernels.fast_launch import launch
from attnrt.kernels.flash.gluon_fwd_sm90 import (
    BLOCK_M,
    CONSUMER_REGS,
    LOG2E,
    SUPPORTED_HEAD_SIZES,
    _Shape,
    _softmax,
    _store,
    allocate_rings,
    grouped_program,
    load_kv,
    load_q,
    tma_descriptor,
)
from attnrt.kernels.gluon_host import INT32 as _INT32
from attnrt.kernels.gluon_host import device_reason as _device_reason
from attnrt.kernels.gluon_host import dtype_reason, tma_reason
from attnrt.kernels.gluon_host import max_offset as _max_offset

MODES = {(128, 64): "shared", (128, 128): "shared", (64, 64): "split"}
STAGES = 2  # slots per K and V ring (as the dense kernel; `forward` takes others for trials)
HALF = gl.constexpr(64)  # query rows per consumer warpgroup
PRODUCER_REGS = gl.constexpr(24)


@aggregate
class _Cfg:
    """Compile-time parameters every partition needs (plain arguments would reach the
    partitions as runtime values)."""

    HEAD_DIM: gl.constexpr
    BLOCK_N: gl.constexpr
    SPLIT: gl.constexpr
    HAS_VALID: gl.constexpr
    MASK: gl.constexpr
    STAGES: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, HEAD_DIM, BLOCK_N, SPLIT, HAS_VALID, MASK, STAGES):  # noqa: N803
        self.HEAD_DIM = gl.constexpr(HEAD_DIM)
        self.BLOCK_N = gl.constexpr(BLOCK_N)
        self.SPLIT = gl.constexpr(SPLIT)
        self.HAS_VALID = gl.constexpr(HAS_VALID)
        self.MASK = gl.constexpr(MASK)
        self.STAGES = gl.constexpr(STAGES)


@gluon.jit
def _producer(ring: gl.constexpr, q_desc, k_desc, v_desc, sm, q_row, q_col, kv_row, kv_col,
              idx_row, s_idx, n_tiles, cfg):
    """Ring `ring`: K and V of the listed key blocks, in list order; ring 0 loads Q first."""
    if ring == 0:
        load_q(q_desc, sm, q_row, q_col)
    for j in range(n_tiles):
        load_kv(k_desc, v_desc, sm, ring * cfg.STAGES + j % cfg.STAGES, j // cfg.STAGES,
                kv_row + gl.load(idx_row + j * s_idx) * cfg.BLOCK_N, kv_col, kv_col)


@gluon.jit
def _producer0(q_desc, k_desc, v_desc, sm, q_row, q_col, kv_row, kv_col, idx_row, s_idx,
               n_tiles, cfg):
    _producer(0, q_desc, k_desc, v_desc, sm, q_row, q_col, kv_row, kv_col, idx_row, s_idx,
              n_tiles, cfg)


@gluon.jit
def _producer1(q_desc, k_desc, v_desc, sm, q_row, q_col, kv_row, kv_col, idx_row, s_idx,
               n_tiles, cfg):
    _producer(1, q_desc, k_desc, v_desc, sm, q_row, q_col, kv_row, kv_col, idx_row, s_idx,
              n_tiles, cfg)


@gluon.jit
def _key_block(j, idx_row, s_idx, n_tiles, cfg):
    """The key block of list entry j (of the last entry past the list's end; the consumers read
    ahead); 0 where no mask needs it."""
    if cfg.MASK:
        return gl.load(idx_row + gl.minimum(j, n_tiles - 1) * s_idx)
    else:
        return gl.to_tensor(0)


@gluon.jit
def _valid_keys(kb, valid_ptr, M, cfg):
    """Keys to attend at the start of key block kb: M - start for the tail block, at most
    key_block_valid's count; BLOCK_N (no mask) where neither can cut a block."""
    if cfg.MASK:
        n = M - kb * cfg.BLOCK_N
        if cfg.HAS_VALID:
            n = gl.minimum(n, gl.load(valid_ptr + kb))
        return n
    else:
        return gl.to_tensor(cfg.BLOCK_N)


@gluon.jit
def _mask_keys(s, n_keys, cfg, col_layout: gl.constexpr):
    """-inf scores past the block's first n_keys columns (only in a block that has fewer)."""
    if cfg.MASK:  # noqa: SIM102 (compile-time test outside, a runtime branch inside)
        if n_keys < cfg.BLOCK_N:
            cols = gl.arange(0, cfg.BLOCK_N, layout=col_layout)
            s = gl.where(cols[None, :] < n_keys, s, float("-inf"))
    return s


@gluon.jit
def _take_turn(sm, wg: gl.constexpr, k, other_turns):
    """Waits for this warpgroup's k-th turn (the other's (k - 1)-th for warpgroup 0, k-th for
    1), unless the other warpgroup takes fewer turns than that (it has finished its list)."""
    if k < other_turns + (1 - wg):
        mbarrier.wait(sm.turn.index(wg), (k & 1) ^ (1 - wg))


@gluon.jit
def _first_tile(wg: gl.constexpr, sm, q, s_zero, m_i, l_i, rows, row0, N, M, qk_scale, n_keys,
                other_turns, cfg, s_layout: gl.constexpr, p_layout: gl.constexpr):
    """Turn 0: S_0 and its softmax; returns P_0 as the next product's operand, max and sum."""
    slot: gl.constexpr = wg * cfg.STAGES if cfg.SPLIT else 0
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    _take_turn(sm, wg, 0, other_turns)
    mbarrier.wait(sm.k_full.index(slot), 0)
    s = warpgroup_mma(q, sm.k.index(slot).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    mbarrier.arrive(sm.turn.index(1 - wg))
    s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.arrive(sm.k_empty.index(slot))
    s = _mask_keys(s, n_keys, cfg, col_s)
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, 0, rows, row0, qk_scale, N, M,
                                  _Shape(cfg.HEAD_DIM, cfg.BLOCK_N, False, False), col_s)
    return gl.convert_layout(p.to(sm.q.dtype), p_layout), m_i, l_i


@gluon.jit
def _last_tile(wg: gl.constexpr, sm, p_op, acc, n_tiles, other_turns, cfg):
    """Turn n_tiles: P_{n-1} V_{n-1}; returns the finished accumulator."""
    base: gl.constexpr = wg * cfg.STAGES if cfg.SPLIT else 0
    last = base + (n_tiles - 1) % cfg.STAGES
    _take_turn(sm, wg, n_tiles, other_turns)
    mbarrier.wait(sm.v_full.index(last), ((n_tiles - 1) // cfg.STAGES) & 1)
    acc = warpgroup_mma(p_op, sm.v.index(last), acc, is_async=True)
    mbarrier.arrive(sm.turn.index(1 - wg))
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(sm.v_empty.index(last))
    return acc


@gluon.jit
def _consumer(wg: gl.constexpr, sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, so_b, so_n,
              so_h, idx_row, s_idx, valid_ptr, n_tiles, other_tiles, cfg):
    HEAD_DIM: gl.constexpr = cfg.HEAD_DIM
    BLOCK_N: gl.constexpr = cfg.BLOCK_N
    STAGES_: gl.constexpr = cfg.STAGES
    base: gl.constexpr = wg * STAGES_ if cfg.SPLIT else 0
    dtype: gl.constexpr = sm.q.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dense = _Shape(HEAD_DIM, BLOCK_N, False, False)  # the masks are applied here
    row0 = m0 + wg * HALF
    rows = row0 + gl.arange(0, HALF, layout=row_s)
    m_i = gl.full([HALF], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([HALF], gl.float32, layout=row_s)
    acc = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)
    other_turns = other_tiles + gl.minimum(other_tiles, 1)  # a list of n tiles: n + 1 turns
    q = sm.q.index(wg)
    mbarrier.wait(sm.q_bar, 0)
    if n_tiles > 0:
        # Masked lists read ahead: entry j + 2's key block and entry j + 1's count during
        # tile j, so no load is waited for before a tile's products are issued.
        n_keys = _valid_keys(_key_block(0, idx_row, s_idx, n_tiles, cfg), valid_ptr, M, cfg)
        kb_next = _key_block(1, idx_row, s_idx, n_tiles, cfg)
        p_op, m_i, l_i = _first_tile(wg, sm, q, s_zero, m_i, l_i, rows, row0, N, M, qk_scale,
                                     n_keys, other_turns, cfg, s_layout, p_layout)
        n_keys = _valid_keys(kb_next, valid_ptr, M, cfg)
        kb_next = _key_block(2, idx_row, s_idx, n_tiles, cfg)
        acc = warpgroup_mma_init(acc)
        for j in range(1, n_tiles):
            n_next = _valid_keys(kb_next, valid_ptr, M, cfg)
            kb_next = _key_block(j + 2, idx_row, s_idx, n_tiles, cfg)
            slot, prev = base + j % STAGES_, base + (j - 1) % STAGES_
            _take_turn(sm, wg, j, other_turns)
            mbarrier.wait(sm.k_full.index(slot), (j // STAGES_) & 1)
            s = warpgroup_mma(q, sm.k.index(slot).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
            mbarrier.wait(sm.v_full.index(prev), ((j - 1) // STAGES_) & 1)
            acc = warpgroup_mma(p_op, sm.v.index(prev), acc, is_async=True)
            mbarrier.arrive(sm.turn.index(1 - wg))
            s = warpgroup_mma_wait(1, deps=(s,))  # S_j done; P_{j-1} V_{j-1} may still run
            mbarrier.arrive(sm.k_empty.index(slot))
            p, alpha, m_i, l_i = _softmax(_mask_keys(s, n_keys, cfg, col_s), m_i, l_i, j,
                                          rows, row0, qk_scale, N, M, dense, col_s)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(sm.v_empty.index(prev))
            acc = warpgroup_mma_init(acc * gl.convert_layout(alpha, row_o)[:, None])
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            n_keys = n_next
        acc = _last_tile(wg, sm, p_op, acc, n_tiles, other_turns, cfg)
    _store(acc, m_i, l_i, o_ptr, lse_ptr, N, b, h, bh, row0, rows, so_b, so_n, so_h, o_layout,
           dtype, HEAD_DIM)


@gluon.jit
def _consumer0(sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, so_b, so_n, so_h, idx_row,
               s_idx, valid_ptr, n_tiles, other_tiles, cfg):
    _consumer(0, sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, so_b, so_n, so_h, idx_row,
              s_idx, valid_ptr, n_tiles, other_tiles, cfg)


@gluon.jit
def _consumer1(sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, so_b, so_n, so_h, idx_row,
               s_idx, valid_ptr, n_tiles, other_tiles, cfg):
    _consumer(1, sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, so_b, so_n, so_h, idx_row,
              s_idx, valid_ptr, n_tiles, other_tiles, cfg)


@gluon.jit
def _allocate(dtype: gl.constexpr, q_desc, k_desc, v_desc, cfg):
    """Q halves, cfg's rings (one, or one per warpgroup when split) and their barriers."""
    slots: gl.constexpr = cfg.STAGES * 2 if cfg.SPLIT else cfg.STAGES
    readers: gl.constexpr = 1 if cfg.SPLIT else 2  # consumers that release each slot
    return allocate_rings(dtype, q_desc, k_desc, v_desc, slots, readers, cfg.BLOCK_N,
                          cfg.HEAD_DIM, cfg.HEAD_DIM)


@gluon.jit
def _fwd_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, idx_ptr, cnt_ptr, valid_ptr, N, M, H,
                GROUP, NQB, qk_scale, so_b, so_n, so_h, si_b, si_h, si_q, si_k, sc_b, sc_h,
                sc_q, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT: gl.constexpr,
                HAS_VALID: gl.constexpr, MASK: gl.constexpr, STAGES: gl.constexpr):
    i, bh = grouped_program(gl.cdiv(N, BLOCK_M), 1)  # row blocks of one head side by side
    b = bh // H
    h = bh % H
    m0 = i * BLOCK_M
    qb = 2 * i if SPLIT else i
    idx0 = idx_ptr + b * si_b + h * si_h + qb * si_q
    c0 = gl.load(cnt_ptr + b * sc_b + h * sc_h + qb * sc_q)
    idx1 = idx0
    c1 = c0
    if SPLIT:  # the second query block; past NQB (odd NQB) it has an empty list
        qb1 = gl.minimum(qb + 1, NQB - 1)
        idx1 = idx_ptr + b * si_b + h * si_h + qb1 * si_q
        c1 = gl.where(qb + 1 < NQB, gl.load(cnt_ptr + b * sc_b + h * sc_h + qb1 * sc_q), 0)
    cfg = _Cfg(HEAD_DIM, BLOCK_N, SPLIT, HAS_VALID, MASK, STAGES)
    sm = _allocate(q_desc.dtype, q_desc, k_desc, v_desc, cfg)
    q_row = b * N + m0
    q_col = h * HEAD_DIM
    kv_row = b * M
    kv_col = (h // GROUP) * HEAD_DIM
    consumer0 = (sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, so_b, so_n, so_h, idx0, si_k,
                 valid_ptr, c0, c1, cfg)
    consumer1 = (sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, so_b, so_n, so_h, idx1, si_k,
                 valid_ptr, c1, c0, cfg)
    producer0 = (q_desc, k_desc, v_desc, sm, q_row, q_col, kv_row, kv_col, idx0, si_k, c0, cfg)
    if SPLIT:
        producer1 = (q_desc, k_desc, v_desc, sm, q_row, q_col, kv_row, kv_col, idx1, si_k, c1,
                     cfg)
        gl.warp_specialize([(_consumer0, consumer0), (_consumer1, consumer1),
                            (_producer0, producer0), (_producer1, producer1)],
                           [4, 1, 1], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([(_consumer0, consumer0), (_consumer1, consumer1),
                            (_producer0, producer0)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor,
           block_count: torch.Tensor, row_mask: torch.Tensor | None, block_q: int,
           block_k: int) -> str | None:
    """Why this forward cannot serve these checked inputs (the Triton kernel then does), or
    None. K and V are read as one 2D tensor over all batches, so with B > 1 a tail tile past M
    would read the next batch's keys: M must then be a multiple of block_k."""
    b, _, _, d = q.shape
    m = k.shape[1]
    if (block_q, block_k) not in MODES:
        return (f"block_q={block_q}, block_k={block_k} (supported: "
                f"{', '.join(f'{bq}x{bk}' for bq, bk in MODES)})")
    if row_mask is not None:
        return "row_mask is given (supported: None)"
    reason = _device_reason(q) or dtype_reason(q)
    if reason is not None:
        return reason
    if d not in SUPPORTED_HEAD_SIZES:
        return f"head_size={d} (supported: {', '.join(map(str, SUPPORTED_HEAD_SIZES))})"
    reason = tma_reason((("q", q), ("k", k), ("v", v)))
    if reason is not None:
        return reason
    if b > 1 and m % block_k:
        return f"B={b} with M={m} not a multiple of block_k={block_k}"
    if max(_max_offset(block_index), _max_offset(block_count)) >= _INT32:
        return "block_index or block_count needs int64 offsets"
    return None


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor,
            block_count: torch.Tensor, key_block_valid: torch.Tensor | None, block_q: int,
            block_k: int, scale: float, out: torch.Tensor, lse: torch.Tensor,
            stages: int = STAGES) -> None:
    """Writes out [B, N, H, D] (contiguous) and lse [B, H, N] (float32, contiguous) for
    checked inputs where `usable` holds. stages: slots per K/V ring."""
    b, n, h, d = q.shape
    m, hkv = k.shape[1], k.shape[2]
    # The kernel reads key_block_valid[kb] at valid_ptr + kb: a strided view (which the API
    # accepts) is made contiguous; without one, any int32 tensor stands in, unread.
    valid = key_block_valid.contiguous() if key_block_valid is not None else block_count
    grid = (cdiv(n, BLOCK_M.value) * b * h,)
    launch(_fwd_kernel, grid,
           (tma_descriptor(q, HALF.value), tma_descriptor(k, block_k),
            tma_descriptor(v, block_k), out, lse, block_index, block_count, valid, n, m, h,
            h // hkv, cdiv(n, block_q), scale * LOG2E.value, out.stride(0), out.stride(1),
            out.stride(2), *block_index.stride(), *block_count.stride()),
           {"HEAD_DIM": d, "BLOCK_N": block_k, "SPLIT": MODES[(block_q, block_k)] == "split",
            "HAS_VALID": key_block_valid is not None,
            "MASK": key_block_valid is not None or m % block_k != 0, "STAGES": stages,
            "num_warps": 4})
