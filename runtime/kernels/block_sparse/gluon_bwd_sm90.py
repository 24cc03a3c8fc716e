"""The block-sparse backward on Hopper in Gluon: the dense Gluon backward's schedule
(attnrt.kernels.flash.gluon_bwd_sm90) driven by the transposed block lists.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size,
NQB = ceil(N / block_q), NKB = ceil(M / block_k), NP = NQB * block_q.

A program owns 128 keys of one (batch, kv head) and walks, for each query head of its group,
the query blocks that visit its keys (k2q) in 64-row steps, as the dense kernel does:

    producer   a warp per Q/dO ring: K and V of its keys once, then the Q and dO tiles of the
               listed query blocks (row qb * block_q + 64 s) by TMA into 2-slot rings
    consumer   two warpgroups of 64 keys, dK and dV in registers: S^T = K Q^T, dP^T = V dO^T,
    0 and 1    P^T from the saved lse, dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q,
               dQ = dS K added to a float32 buffer by TMA reduce-adds (order varies by run)

Modes, by (block_q, block_k) (MODES):
- whole (128 x 128, FlexAttention's blocks): the program is one key block; one producer and
  both warpgroups walk its list, as the dense kernel (at D=128 exchanging dS^T halves).
- pair (64 x 64 VSA's cubes, 128 x 64 SLA's blocks): the program is key blocks 2j and 2j + 1;
  warpgroup w walks block 2j + w's list through its own ring and producer, adds dQ over its
  own 64 keys (at D=128 in two 64-column halves) and keeps dS^T in its dQ staging tile (two
  rings leave no room for both). An odd NKB leaves the last second warpgroup an empty list.
P = 0 past the valid keys of a key block (the tail past M, key_block_valid): dK, dV are 0 there.
K and V are two 64-key tiles, indexed each step through wg + (m0 >> 31) (m0 >= 0): with a
constant index their wgmma descriptors were hoisted out of the loop and spilled at D=128.

Contract as launch._backward's Triton kernels: q, dout [B, N, H, D], k, v [B, M, Hkv, D] (GQA
by head index); lse2, delta [B, H, NP] float32 (launch._row_terms; lse2 = +inf past N); k2q
int32 [B, H, NKB, NQB], k2q_count int32 [B, H, NKB] (contiguous, launch.transpose_lists);
key_block_valid int32 [NKB] or None. Writes dk, dv [B, M, Hkv, D] (contiguous) and adds into
dq_acc [B, N, H, D] float32 (zeroed by the caller). `usable` says where it runs (else the
Triton kernels serve the same computation). Written against Triton 3.6.

No `from __future__ import annotations`: Gluon's aggregate reads annotations as types.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate
from triton.language.core import _unwrap_if_constexpr as unwrap

from attnrt.kernels import cdiv
from attnrt.kernels.fast_launch import launch
from attnrt.kernels.flash.gluon_bwd_sm90 import (
    _DQ_LAYOUT,
    BLOCK_M,
    CONSUMER_REGS,
    DQ_BOX,
    STAGES,
    SUPPORTED_HEAD_SIZES,
    _issue_scores,
    _Layouts,
    _Smem,
    _tma_load,
    _tma_reduce_add,
)
from attnrt.kernels.flash.gluon_fwd_sm90 import grouped_program, tma_descriptor
from attnrt.kernels.gluon_host import INT32 as _INT32
from attnrt.kernels.gluon_host import device_reason as _device_reason
from attnrt.kernels.gluon_host import dtype_reason, tma_reason
from attnrt.kernels.gluon_host import max_offset as _max_offset

from .gluon_fwd_sm90 import PRODUCER_REGS

MODES = {(128, 128): "whole", (128, 64): "pair", (64, 64): "pair"}
HALF = gl.constexpr(64)  # keys per consumer warpgroup


@aggregate
class _Cfg:
    """Compile-time parameters every partition needs."""

    HEAD_DIM: gl.constexpr
    BLOCK_Q: gl.constexpr
    BLOCK_K: gl.constexpr
    PAIR: gl.constexpr  # a warpgroup per key block, each its own list and ring
    HAS_VALID: gl.constexpr
    MASK: gl.constexpr  # some key block may hold fewer valid keys than block_k
    SPLIT_D: gl.constexpr  # whole mode, D=128: dQ as half of D over all 128 keys a warpgroup
    DQ_COLS: gl.constexpr  # columns of one dQ tile

    @gluon.constexpr_function
    def __init__(self, HEAD_DIM, BLOCK_Q, BLOCK_K, PAIR, HAS_VALID, MASK):  # noqa: N803
        self.HEAD_DIM = gl.constexpr(HEAD_DIM)
        self.BLOCK_Q = gl.constexpr(BLOCK_Q)
        self.BLOCK_K = gl.constexpr(BLOCK_K)
        self.PAIR = gl.constexpr(PAIR)
        self.HAS_VALID = gl.constexpr(HAS_VALID)
        self.MASK = gl.constexpr(MASK)
        self.SPLIT_D = gl.constexpr(not PAIR and HEAD_DIM >= 128)
        self.DQ_COLS = gl.constexpr(64)  # D=64: all of D; D=128: half (or a chunk)


@builtin
def _view(smem, dtype, shape, layout, _semantic=None):
    """smem's bytes as a [shape] dtype tile (`_reinterpret` in Triton 3.6, `reinterpret` later)."""
    return _semantic.memdesc_reinterpret(smem, unwrap(dtype), [unwrap(x) for x in shape],
                                         unwrap(layout))


@gluon.jit
def _list(k2q_ptr, cnt_ptr, b, h, H, kb, NQB, NKB, cfg):
    """(first entry, 64-row steps) of head h's list for key block kb (none past NKB)."""
    row = (b * H + h) * NKB + gl.minimum(kb, NKB - 1)
    count = gl.where(kb < NKB, gl.load(cnt_ptr + row), 0)
    return k2q_ptr + row * NQB, count * (cfg.BLOCK_Q // BLOCK_M)


@gluon.jit
def _query_row(lst, j, cfg):
    """First query row of step j of a list (64-row steps through each listed block)."""
    steps: gl.constexpr = cfg.BLOCK_Q // BLOCK_M
    return gl.load(lst + j // steps) * cfg.BLOCK_Q + (j % steps) * BLOCK_M


@gluon.jit
def _total_steps(k2q_ptr, cnt_ptr, b, h0, H, kb, NQB, NKB, n_group, cfg):
    total = 0
    for g in range(n_group):
        _, n = _list(k2q_ptr, cnt_ptr, b, h0 + g, H, kb, NQB, NKB, cfg)
        total += n
    return total


@gluon.jit
def _producer(ring: gl.constexpr, q_desc, k_desc, v_desc, do_desc, sm, k2q_ptr, cnt_ptr, b, h0,
              hk, kb, N, M, H, NQB, NKB, n_group, cfg):
    """Ring `ring`: K, V of key block kb (where visited), then each step's Q and dO tiles."""
    if _total_steps(k2q_ptr, cnt_ptr, b, h0, H, kb, NQB, NKB, n_group, cfg) > 0:
        bar = sm.kv_bar.index(ring)
        mbarrier.expect(bar, 2 * (cfg.BLOCK_K // HALF) * k_desc.block_type.nbytes)
        for i in gl.static_range(cfg.BLOCK_K // HALF):  # 64-key tiles
            at = [b * M + kb * cfg.BLOCK_K + i * HALF, hk * cfg.HEAD_DIM]
            _tma_load(k_desc, at, bar, sm.k.index(ring + i))
            _tma_load(v_desc, at, bar, sm.v.index(ring + i))
    t = 0
    for g in range(n_group):
        col = (h0 + g) * cfg.HEAD_DIM
        lst, n = _list(k2q_ptr, cnt_ptr, b, h0 + g, H, kb, NQB, NKB, cfg)
        for j in range(n):
            row = b * N + _query_row(lst, j, cfg)
            slot = t % STAGES
            free = ((t // STAGES) & 1) ^ 1  # a fresh barrier passes the wait for parity 1
            mbarrier.wait(sm.q_empty.index(slot), free)
            mbarrier.expect(sm.q_full.index(slot), q_desc.block_type.nbytes)
            _tma_load(q_desc, [row, col], sm.q_full.index(slot), sm.q.index(slot))
            mbarrier.wait(sm.do_empty.index(slot), free)
            mbarrier.expect(sm.do_full.index(slot), do_desc.block_type.nbytes)
            _tma_load(do_desc, [row, col], sm.do_full.index(slot), sm.do.index(slot))
            t += 1


@gluon.jit
def _producer0(q_desc, k_desc, v_desc, do_desc, sm, k2q_ptr, cnt_ptr, b, h0, hk, kb, N, M, H,
               NQB, NKB, n_group, cfg):
    _producer(0, q_desc, k_desc, v_desc, do_desc, sm, k2q_ptr, cnt_ptr, b, h0, hk, kb, N, M, H,
              NQB, NKB, n_group, cfg)


@gluon.jit
def _producer1(q_desc, k_desc, v_desc, do_desc, sm, k2q_ptr, cnt_ptr, b, h0, hk, kb, N, M, H,
               NQB, NKB, n_group, cfg):
    _producer(1, q_desc, k_desc, v_desc, do_desc, sm, k2q_ptr, cnt_ptr, b, h0, hk, kb, N, M, H,
              NQB, NKB, n_group, cfg)


@gluon.jit
def _grads(sm, t, s_t, dp_t, dk, dv, lse2_h, delta_h, m0, n_keys, qk_scale, lay, cfg):
    """P^T (0 past n_keys keys) from step t's S^T, dV and dK issued; returns dS^T, dK, dV."""
    dtype: gl.constexpr = sm.q.dtype
    slot = t % STAGES
    cols = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, lay.s))
    lse2 = gl.load(lse2_h + cols)  # rows past N: +inf, so P = 0 there
    delta = gl.load(delta_h + cols)
    s_t = warpgroup_mma_wait(1, deps=(s_t,))  # dP^T may still run
    p_t = gl.exp2(s_t * qk_scale - lse2[None, :])
    if cfg.MASK:
        p_t = gl.where(n_keys[:, None], p_t, 0.0)
    dv = warpgroup_mma(gl.convert_layout(p_t.to(dtype), lay.a), sm.do.index(slot), dv,
                       is_async=True)
    dp_t = warpgroup_mma_wait(1, deps=(dp_t,))  # dV may still run
    ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
    dk = warpgroup_mma(gl.convert_layout(ds_t, lay.a), sm.q.index(slot), dk, is_async=True)
    return ds_t, dk, dv


@gluon.jit
def _reduce_dq(tile, dq_desc, dq, row, col):
    """Adds dQ (registers) at (row, col) via the staging tile, DQ_BOX columns a TMA reduce."""
    tile.store(dq)
    fence_async_shared()
    for c in gl.static_range(0, dq.shape[1], DQ_BOX):
        _tma_reduce_add(dq_desc, [row, col + c], tile.slice(c, DQ_BOX, dim=1))


@gluon.jit
def _release(sm, t):
    mbarrier.arrive(sm.q_empty.index(t % STAGES))
    mbarrier.arrive(sm.do_empty.index(t % STAGES))


@gluon.jit
def _step_whole(wg: gl.constexpr, sm, t, dk, dv, s_zero, dq_zero, lse2_h, delta_h, dq_desc, row,
                m0, col, n_keys, qk_scale, sm_scale, lay, cfg):
    """A whole-mode step: both warpgroups on the same 64 rows (the dense _step, _add_dq)."""
    z = m0 >> 31  # 0 (m0 >= 0) per step: K, V descriptors not hoisted and spilled
    s_t, dp_t = _issue_scores(sm, t, sm.k.index(wg + z), sm.v.index(wg + z), s_zero)
    ds_t, dk, dv = _grads(sm, t, s_t, dp_t, dk, dv, lse2_h, delta_h, m0, n_keys, qk_scale, lay,
                          cfg)
    if cfg.SPLIT_D:
        ds = sm.ds.index(t % 2)
        ds.slice(wg * HALF, HALF).store(ds_t)
        fence_async_shared()
        mbarrier.arrive(sm.ds_ready.index(t % 2))
        mbarrier.wait(sm.ds_ready.index(t % 2), (t // 2) & 1)
        col += wg * cfg.DQ_COLS
        dq = dq_zero
        for i in gl.static_range(2):  # keys of K tile i, this warpgroup's half of D
            dq = warpgroup_mma(ds.slice(i * HALF, HALF).permute((1, 0)),
                               sm.k.index(z + i).slice(wg * cfg.DQ_COLS, cfg.DQ_COLS, dim=1),
                               dq, use_acc=i > 0, is_async=True)
    else:
        ds = sm.ds.index(wg).slice(0, HALF)
        ds.store(ds_t)
        fence_async_shared()
        dq = warpgroup_mma(ds.permute((1, 0)), sm.k.index(wg + z), dq_zero, use_acc=False,
                           is_async=True)
    dq, dk, dv = warpgroup_mma_wait(0, deps=(dq, dk, dv))
    _release(sm, t)
    tma.store_wait(0)  # the previous step's reduces have read the tile
    _reduce_dq(sm.dq.index(wg), dq_desc, dq * sm_scale, row, col)
    return warpgroup_mma_init(dk), warpgroup_mma_init(dv)


@gluon.jit
def _step_pair(wg: gl.constexpr, sm, t, dk, dv, s_zero, dq_zero, lse2_h, delta_h, dq_desc, row,
               m0, col, n_keys, qk_scale, sm_scale, lay, cfg):
    """One pair-mode step: own rows, dQ over own keys; dS^T staged in the dQ tile first."""
    dtype: gl.constexpr = sm.q.dtype
    k_w = sm.k.index(wg + (m0 >> 31))  # as in _step_whole
    s_t, dp_t = _issue_scores(sm, t, k_w, sm.v.index(wg + (m0 >> 31)), s_zero)
    ds_t, dk, dv = _grads(sm, t, s_t, dp_t, dk, dv, lse2_h, delta_h, m0, n_keys, qk_scale, lay,
                          cfg)
    tile = sm.dq.index(wg)
    ds = _view(tile, dtype, [HALF, BLOCK_M],
               gl.NVMMASharedLayout.get_default_for([HALF, BLOCK_M], dtype))
    tma.store_wait(0)  # the previous step's reduces have read the tile
    ds.store(ds_t)
    fence_async_shared()
    if cfg.HEAD_DIM > 64:  # dK, dV done (and their register operands free) before dQ's two
        dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))  # products: else ptxas serializes wgmma
    dq0 = warpgroup_mma(ds.permute((1, 0)), k_w.slice(0, 64, dim=1), dq_zero, use_acc=False,
                        is_async=True)
    if cfg.HEAD_DIM > 64:
        dq1 = warpgroup_mma(ds.permute((1, 0)), k_w.slice(64, 64, dim=1), dq_zero,
                            use_acc=False, is_async=True)
        dq0, dq1, dk, dv = warpgroup_mma_wait(0, deps=(dq0, dq1, dk, dv))
        _release(sm, t)
        _reduce_dq(tile, dq_desc, dq0 * sm_scale, row, col)
        tma.store_wait(0)
        _reduce_dq(tile, dq_desc, dq1 * sm_scale, row, col + 64)
    else:
        dq0, dk, dv = warpgroup_mma_wait(0, deps=(dq0, dk, dv))
        _release(sm, t)
        _reduce_dq(tile, dq_desc, dq0 * sm_scale, row, col)
    return warpgroup_mma_init(dk), warpgroup_mma_init(dv)


@gluon.jit
def _valid_keys(kb, valid_ptr, M, cfg):
    """Valid keys of key block kb (M - start, at most key_block_valid's); block_k unmasked."""
    n = gl.to_tensor(cfg.BLOCK_K)
    if cfg.MASK:
        n = M - kb * cfg.BLOCK_K
        if cfg.HAS_VALID:
            n = gl.minimum(n, gl.load(valid_ptr + gl.minimum(kb, gl.cdiv(M, cfg.BLOCK_K) - 1)))
    return n


@gluon.jit
def _store_dkdv(dk, dv, dk_ptr, dv_ptr, b, hk, key0, M, sm_scale, sdk_b, sdk_n, sdk_h, dtype,
                lay):
    rows_o = key0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, lay.acc))
    cols_o = gl.arange(0, dk.shape[1], layout=gl.SliceLayout(0, lay.acc))
    offs = b * sdk_b + hk * sdk_h + rows_o[:, None] * sdk_n + cols_o[None, :]
    keep = (rows_o < M)[:, None]
    gl.store(dk_ptr + offs, (dk * sm_scale).to(dtype), mask=keep)
    gl.store(dv_ptr + offs, dv.to(dtype), mask=keep)


@gluon.jit
def _consumer(wg: gl.constexpr, sm, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, k2q_ptr,
              cnt_ptr, valid_ptr, b, h0, hk, kb, N, M, H, NP, NQB, NKB, n_group, qk_scale,
              sm_scale, sdk_b, sdk_n, sdk_h, cfg):
    HEAD_DIM: gl.constexpr = cfg.HEAD_DIM
    lay = _Layouts(HEAD_DIM, cfg.DQ_COLS)
    ring: gl.constexpr = wg if cfg.PAIR else 0
    own = kb + wg if cfg.PAIR else kb  # this warpgroup's key block (kb: the pair's first)
    key0 = own * cfg.BLOCK_K + (0 if cfg.PAIR else wg * HALF)
    n_keys = _valid_keys(own, valid_ptr, M, cfg) - (0 if cfg.PAIR else wg * HALF)
    n_keys = gl.arange(0, HALF, layout=gl.SliceLayout(1, lay.s)) < n_keys
    dq_zero = gl.zeros([BLOCK_M, cfg.DQ_COLS], gl.float32, layout=lay.dq)
    dk = warpgroup_mma_init(gl.zeros([HALF, HEAD_DIM], gl.float32, layout=lay.acc))
    dv = warpgroup_mma_init(gl.zeros([HALF, HEAD_DIM], gl.float32, layout=lay.acc))
    s_zero = gl.zeros([HALF, BLOCK_M], gl.float32, layout=lay.s)
    if _total_steps(k2q_ptr, cnt_ptr, b, h0, H, own, NQB, NKB, n_group, cfg) > 0:
        mbarrier.wait(sm.kv_bar.index(ring), 0)
    t = 0
    for g in range(n_group):
        h = h0 + g
        stats = (b * H + h) * NP
        lst, n = _list(k2q_ptr, cnt_ptr, b, h, H, own, NQB, NKB, cfg)
        for j in range(n):
            m0 = _query_row(lst, j, cfg)
            if cfg.PAIR:
                dk, dv = _step_pair(wg, sm, t, dk, dv, s_zero, dq_zero,
                                    lse2_ptr + stats, delta_ptr + stats, dq_desc, b * N + m0,
                                    m0, h * HEAD_DIM, n_keys, qk_scale, sm_scale, lay, cfg)
            else:
                dk, dv = _step_whole(wg, sm, t, dk, dv, s_zero, dq_zero,
                                     lse2_ptr + stats, delta_ptr + stats, dq_desc, b * N + m0,
                                     m0, h * HEAD_DIM, n_keys, qk_scale, sm_scale, lay, cfg)
            t += 1
    dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
    tma.store_wait(0)
    _store_dkdv(dk, dv, dk_ptr, dv_ptr, b, hk, key0, M, sm_scale, sdk_b, sdk_n, sdk_h,
                sm.q.dtype, lay)


@gluon.jit
def _consumer0(sm, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, k2q_ptr, cnt_ptr, valid_ptr, b,
               h0, hk, kb, N, M, H, NP, NQB, NKB, n_group, qk_scale, sm_scale, sdk_b, sdk_n,
               sdk_h, cfg):
    _consumer(0, sm, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, k2q_ptr, cnt_ptr, valid_ptr,
              b, h0, hk, kb, N, M, H, NP, NQB, NKB, n_group, qk_scale, sm_scale, sdk_b, sdk_n,
              sdk_h, cfg)


@gluon.jit
def _consumer1(sm, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, k2q_ptr, cnt_ptr, valid_ptr, b,
               h0, hk, kb, N, M, H, NP, NQB, NKB, n_group, qk_scale, sm_scale, sdk_b, sdk_n,
               sdk_h, cfg):
    _consumer(1, sm, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, k2q_ptr, cnt_ptr, valid_ptr,
              b, h0, hk, kb, N, M, H, NP, NQB, NKB, n_group, qk_scale, sm_scale, sdk_b, sdk_n,
              sdk_h, cfg)


@gluon.jit
def _allocate_ring(dtype: gl.constexpr, q_desc, do_desc, k, v, ds, kv_bar, ds_ready, dq,
                   readers: gl.constexpr, cfg):
    """A Q/dO ring (STAGES slots; `readers` consumers free one) and the shared tiles, as _Smem."""
    barrier: gl.constexpr = mbarrier.MBarrierLayout()
    sm = _Smem(k, v, gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, cfg.HEAD_DIM],
                                               q_desc.layout),
               gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, cfg.HEAD_DIM],
                                         do_desc.layout),
               ds, kv_bar,
               gl.allocate_shared_memory(gl.int64, [STAGES, 1], barrier),
               gl.allocate_shared_memory(gl.int64, [STAGES, 1], barrier),
               gl.allocate_shared_memory(gl.int64, [STAGES, 1], barrier),
               gl.allocate_shared_memory(gl.int64, [STAGES, 1], barrier),
               ds_ready, dq)
    for i in gl.static_range(STAGES):
        mbarrier.init(sm.q_full.index(i), count=1)
        mbarrier.init(sm.do_full.index(i), count=1)
        mbarrier.init(sm.q_empty.index(i), count=readers)
        mbarrier.init(sm.do_empty.index(i), count=readers)
    return sm


@gluon.jit
def _allocate(dtype: gl.constexpr, q_desc, k_desc, v_desc, do_desc, dq_desc, cfg):
    """Warpgroup 0's and 1's views of shared memory: K, V (64-key tiles), dS^T, dQ, barriers,
    and the Q/dO ring: one for both (whole mode) or one each (pair: dS^T in the dQ tile)."""
    barrier: gl.constexpr = mbarrier.MBarrierLayout()
    dq = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, cfg.DQ_COLS], dq_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([2 * HALF, BLOCK_M], dtype)
    ds = dq if cfg.PAIR else gl.allocate_shared_memory(dtype, [2, 2 * HALF, BLOCK_M], ds_layout)
    k = gl.allocate_shared_memory(dtype, [2, HALF, cfg.HEAD_DIM], k_desc.layout)
    v = gl.allocate_shared_memory(dtype, [2, HALF, cfg.HEAD_DIM], v_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [2, 1], barrier)
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], barrier)
    for i in gl.static_range(2):
        mbarrier.init(kv_bar.index(i), count=1)
        mbarrier.init(ds_ready.index(i), count=2)  # one arrival per consumer
    readers: gl.constexpr = 1 if cfg.PAIR else 2
    sm0 = _allocate_ring(dtype, q_desc, do_desc, k, v, ds, kv_bar, ds_ready, dq, readers, cfg)
    sm1 = sm0
    if cfg.PAIR:
        sm1 = _allocate_ring(dtype, q_desc, do_desc, k, v, ds, kv_bar, ds_ready, dq, readers,
                             cfg)
    return sm0, sm1


@gluon.jit(do_not_specialize=["N", "M", "NP"])
def _bwd_kernel(q_desc, k_desc, v_desc, do_desc, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr,
                k2q_ptr, cnt_ptr, valid_ptr, N, M, H, HKV, NP, NQB, NKB, qk_scale, sm_scale,
                sdk_b, sdk_n, sdk_h, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr,
                BLOCK_K: gl.constexpr, PAIR: gl.constexpr, HAS_VALID: gl.constexpr,
                MASK: gl.constexpr):
    cfg = _Cfg(HEAD_DIM, BLOCK_Q, BLOCK_K, PAIR, HAS_VALID, MASK)
    per_head = gl.cdiv(NKB, 2) if PAIR else NKB
    i, bhk = grouped_program(per_head, 1)  # key blocks of one kv head side by side
    kb = 2 * i if PAIR else i
    b = bhk // HKV
    hk = bhk % HKV
    n_group = H // HKV
    h0 = hk * n_group
    sm0, sm1 = _allocate(q_desc.dtype, q_desc, k_desc, v_desc, do_desc, dq_desc, cfg)
    consumer0 = (sm0, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, k2q_ptr, cnt_ptr, valid_ptr,
                 b, h0, hk, kb, N, M, H, NP, NQB, NKB, n_group, qk_scale, sm_scale, sdk_b, sdk_n,
                 sdk_h, cfg)
    consumer1 = (sm1, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, k2q_ptr, cnt_ptr, valid_ptr,
                 b, h0, hk, kb, N, M, H, NP, NQB, NKB, n_group, qk_scale, sm_scale, sdk_b, sdk_n,
                 sdk_h, cfg)
    producer0 = (q_desc, k_desc, v_desc, do_desc, sm0, k2q_ptr, cnt_ptr, b, h0, hk, kb, N, M,
                 H, NQB, NKB, n_group, cfg)
    if PAIR:
        producer1 = (q_desc, k_desc, v_desc, do_desc, sm1, k2q_ptr, cnt_ptr, b, h0, hk, kb + 1,
                     N, M, H, NQB, NKB, n_group, cfg)
        gl.warp_specialize([(_consumer0, consumer0), (_consumer1, consumer1),
                            (_producer0, producer0), (_producer1, producer1)],
                           [4, 1, 1], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([(_consumer0, consumer0), (_consumer1, consumer1),
                            (_producer0, producer0)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _tensor_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   dout: torch.Tensor) -> str | None:
    reason = dtype_reason(q)
    if reason is not None:
        return reason
    if q.shape[3] not in SUPPORTED_HEAD_SIZES:
        return f"head_size={q.shape[3]} (supported: {', '.join(map(str, SUPPORTED_HEAD_SIZES))})"
    return tma_reason((("q", q), ("k", k), ("v", v), ("dout", dout)))


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
           k2q: torch.Tensor, row_mask: torch.Tensor | None, block_q: int, block_k: int,
           deterministic: bool) -> str | None:
    """Why this backward cannot serve these checked inputs (the Triton kernels then do), or
    None; k2q (the transposed lists) may be None before they are built. Tensors are read as
    2D [B * L, Hx * D], so with B > 1 a tile past N or M would read the next batch's rows: N
    and M must then be multiples of the blocks."""
    b, n, m = q.shape[0], q.shape[1], k.shape[1]
    if (block_q, block_k) not in MODES:
        return (f"block_q={block_q}, block_k={block_k} (supported: "
                f"{', '.join(f'{bq}x{bk}' for bq, bk in MODES)})")
    if row_mask is not None:
        return "row_mask is given (supported: None)"
    if deterministic or torch.are_deterministic_algorithms_enabled():
        return "deterministic mode (dQ is summed by TMA reduce-adds in a varying order)"
    reason = _device_reason(q) or _tensor_reason(q, k, v, dout)
    if reason is not None:
        return reason
    if b > 1 and (n % block_q or m % block_k):
        return (f"B={b} with N={n}, M={m} not multiples of block_q={block_q}, "
                f"block_k={block_k} (a tile would cross batches)")
    if b * q.shape[2] * cdiv(n, block_q) * block_q >= _INT32 or (
            k2q is not None and _max_offset(k2q) >= _INT32):
        return "offsets past int32 (the transposed lists or the row statistics lse2, delta)"
    return None


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
             lse2: torch.Tensor, delta: torch.Tensor, k2q: torch.Tensor,
             k2q_count: torch.Tensor, key_block_valid: torch.Tensor | None, block_q: int,
             block_k: int, scale: float, dq_acc: torch.Tensor, dk: torch.Tensor,
             dv: torch.Tensor) -> None:
    """Adds dQ into dq_acc ([B, N, H, D] float32, contiguous, zeroed) and writes dk, dv
    (contiguous, like k) for checked inputs where `usable` holds."""
    b, n, h, d = q.shape
    m, hkv = k.shape[1], k.shape[2]
    nkb = cdiv(m, block_k)
    pair = MODES[(block_q, block_k)] == "pair"
    grid = ((cdiv(nkb, 2) if pair else nkb) * b * hkv,)
    dq_desc = TensorDescriptor(dq_acc, [b * n, h * d], [h * d, 1], [BLOCK_M.value, DQ_BOX.value],
                               _DQ_LAYOUT)
    valid = k2q_count if key_block_valid is None else key_block_valid.contiguous()  # read as [kb]
    launch(_bwd_kernel, grid,
           (tma_descriptor(q, BLOCK_M.value), tma_descriptor(k, HALF.value),
            tma_descriptor(v, HALF.value), tma_descriptor(dout, BLOCK_M.value), lse2, delta,
            dq_desc, dk, dv, k2q, k2q_count, valid, n, m, h, hkv, lse2.shape[2],
            k2q.shape[3], nkb, scale * 1.4426950408889634, scale, dk.stride(0), dk.stride(1),
            dk.stride(2)),
           {"HEAD_DIM": d, "BLOCK_Q": block_q, "BLOCK_K": block_k, "PAIR": pair,
            "HAS_VALID": key_block_valid is not None,
            "MASK": key_block_valid is not None or m % block_k != 0, "num_warps": 4})
