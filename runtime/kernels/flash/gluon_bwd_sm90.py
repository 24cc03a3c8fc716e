"""TRITON_FLASH_ATTN's backward on Hopper in Gluon: warp-specialized, dQ by TMA reduce-add.

The Triton backward stays near 0.75-0.8x cuDNN at D=128 (bench/NOTES-triton-flash.md): its
dK/dV programs either leave dQ to separate programs that recompute S and dP (7 products, not
5) or, with dQ in the same program, run short of registers. Here one program owns 128 keys of
one (batch, kv head) and walks the 64-row query blocks of every query head that reads them:

    producer   one warp: K and V once, then Q and dO by TMA into 2-slot rings, a slot
               refilled when both consumers have released it
    consumer   two warpgroups, one per 64 keys, each keeping its dK and dV in registers. Per
    0 and 1    query block: S^T = K Q^T and dP^T = V dO^T (async), P^T from the saved
               log-sum-exp, dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q; then dQ =
               dS K, added to a float32 buffer by TMA reduce-adds (cp.reduce.async.bulk) from
               a swizzled staging tile. At D=128 both halves of dS^T go to shared memory and each
               warpgroup takes half of D over all 128 keys; at D=64 each takes all of D over
               its own 64 keys (no exchange, twice the reduce traffic)

How dQ is added decides the speed (D=128 non-causal, over cuDNN): element atomics 0.70-0.74x
(each warpgroup's half by vector atomics; 0.53-0.58x with each adding a whole tile), the bulk
reduce from an unswizzled tile 0.79-0.86x, from a swizzled one 0.88-0.97x (H200 and H100). The
sum's order, so dQ's last bits, varies between runs. Figures, and where this kernel is shipped:
bench/NOTES-triton-flash.md (seventh session).

Contract as triton_flash's backward kernels: q, dout [B, N, H, D], k, v [B, M, Hkv, D] (GQA by
head index), bottom-right causal masks; lse2 and delta [B, H, NP] from _bwd_delta_kernel (rows
past N padded so that P = 0 there); writes dk, dv [B, M, Hkv, D] and adds into dq_acc
[B, N, H, D] float32 (zeroed by the caller). Runs where `usable` says so (sm90, fp16/bf16,
D = 64 or 128, TMA-readable tensors, tiles within one batch); triton_flash's Triton kernels serve
everything else. Written against Triton 3.6; checked against float64 in tests/kernels (GPU).

No `from __future__ import annotations` here: Gluon's aggregate checks field annotations as
real types.
"""

import torch
from triton._C.libtriton import ir
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

from attnrt.kernels import cdiv
from attnrt.kernels.fast_launch import launch
from attnrt.kernels.flash.gluon_fwd_sm90 import grouped_program, tma_descriptor
from attnrt.kernels.gluon_compat import tma_load as _tma_load
from attnrt.kernels.gluon_host import device_reason, tma_readable

SUPPORTED_HEAD_SIZES = (64, 128)
# Causal launches at these head sizes run each warpgroup's masked steps first and then an
# unmasked loop; the others keep one loop that masks where a step needs it. H100, causal,
# over cuDNN: D=128 peeled 0.87 vs 0.76 at N=16384 (one loop spilled 236 bytes a thread);
# D=64 peeled 0.89 / 0.81 vs one loop 0.94 / 0.84 at N=4096 / 16384 (bench/NOTES-triton-flash.md,
# ninth session).
PEELED_HEAD_SIZES = (128,)
BLOCK_N = gl.constexpr(128)  # keys per program: two consumer warpgroups of 64
BLOCK_M = gl.constexpr(64)  # query rows per step
STAGES = gl.constexpr(2)  # Q and dO ring slots
CONSUMER_REGS = gl.constexpr(240)
# dQ is staged in 128-byte-swizzled tiles and added DQ_BOX float32 columns (128 bytes, the
# swizzle span) per TMA reduce. H100, D=128 N=16384: 452 TFLOP/s from an unswizzled tile (its
# stores 8-way bank-conflicted), 492 swizzled; 599 without the hand-over at all.
DQ_BOX = gl.constexpr(32)


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Adds the shared tile src into global memory at coord (cp.reduce.async.bulk.tensor).
    Triton 3.6 builds the op but its Gluon has no Python wrapper for it yet."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle,
                                              coord, src.handle)


@aggregate
class _Shape:
    """Compile-time parameters every partition needs."""

    HEAD_DIM: gl.constexpr
    CAUSAL: gl.constexpr
    PEEL: gl.constexpr  # causal: masked steps first, then an unmasked loop (else one loop)
    SPLIT_D: gl.constexpr  # dQ: each warpgroup half of D over 128 keys (else all D over its 64)
    DQ_COLS: gl.constexpr  # columns of a warpgroup's dQ tile

    @gluon.constexpr_function
    def __init__(self, HEAD_DIM, CAUSAL, PEEL):  # noqa: N803 (constexpr names)
        self.HEAD_DIM = gl.constexpr(HEAD_DIM)
        self.CAUSAL = gl.constexpr(CAUSAL)
        self.PEEL = gl.constexpr(CAUSAL and PEEL)
        self.SPLIT_D = gl.constexpr(HEAD_DIM >= 128)
        self.DQ_COLS = gl.constexpr(HEAD_DIM // 2 if HEAD_DIM >= 128 else HEAD_DIM)


@aggregate
class _Smem:
    """K, V (the program's key block), Q and dO rings, dS^T (two slots), the consumers' dQ
    staging tiles, and the barriers."""

    k: gl.shared_memory_descriptor
    v: gl.shared_memory_descriptor
    q: gl.shared_memory_descriptor
    do: gl.shared_memory_descriptor
    ds: gl.shared_memory_descriptor
    kv_bar: gl.shared_memory_descriptor
    q_full: gl.shared_memory_descriptor
    q_empty: gl.shared_memory_descriptor
    do_full: gl.shared_memory_descriptor
    do_empty: gl.shared_memory_descriptor
    ds_ready: gl.shared_memory_descriptor
    dq: gl.shared_memory_descriptor

    @gluon.constexpr_function
    def __init__(self, k, v, q, do, ds, kv_bar, q_full, q_empty, do_full, do_empty, ds_ready,
                 dq):
        self.k, self.v, self.q, self.do, self.ds = k, v, q, do, ds
        self.kv_bar, self.q_full, self.q_empty = kv_bar, q_full, q_empty
        self.do_full, self.do_empty, self.ds_ready = do_full, do_empty, ds_ready
        self.dq = dq


@gluon.jit
def _query_block(t, lo, n_steps):
    """First query row of step t (the steps walk each query head's blocks from lo up; walking
    down instead, so that programs starting together share tiles in L2, measured no faster)."""
    return lo + (t % n_steps) * BLOCK_M


@gluon.jit
def _producer(q_desc, k_desc, v_desc, do_desc, sm, b, h0, hk, start_n, N, M, lo, n_steps,
              steps, shape):
    HEAD_DIM: gl.constexpr = shape.HEAD_DIM
    mbarrier.expect(sm.kv_bar, 2 * k_desc.block_type.nbytes)
    _tma_load(k_desc, [b * M + start_n, hk * HEAD_DIM], sm.kv_bar, sm.k)
    _tma_load(v_desc, [b * M + start_n, hk * HEAD_DIM], sm.kv_bar, sm.v)
    for t in range(steps):
        h = h0 + t // n_steps
        row = b * N + _query_block(t, lo, n_steps)
        slot = t % STAGES
        free = ((t // STAGES) & 1) ^ 1  # a fresh barrier passes the wait for parity 1
        mbarrier.wait(sm.q_empty.index(slot), free)
        mbarrier.expect(sm.q_full.index(slot), q_desc.block_type.nbytes)
        _tma_load(q_desc, [row, h * HEAD_DIM], sm.q_full.index(slot),
                                        sm.q.index(slot))
        mbarrier.wait(sm.do_empty.index(slot), free)
        mbarrier.expect(sm.do_full.index(slot), do_desc.block_type.nbytes)
        _tma_load(do_desc, [row, h * HEAD_DIM], sm.do_full.index(slot),
                                        sm.do.index(slot))


@aggregate
class _Layouts:
    """Register layouts of a consumer warpgroup (64 rows each)."""

    s: gl.constexpr  # S^T, dP^T: [64 keys, 64 queries]
    acc: gl.constexpr  # dK, dV: [64 keys, D]
    dq: gl.constexpr  # dQ: [64 queries, DQ_COLS]
    a: gl.constexpr  # P^T and dS^T as the register operand of dV and dK

    @gluon.constexpr_function
    def __init__(self, HEAD_DIM, DQ_COLS):  # noqa: N803 (constexpr names)
        self.s = gl.constexpr(gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16]))
        self.acc = gl.constexpr(gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]))
        self.dq = gl.constexpr(gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DQ_COLS, 16]))
        self.a = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=self.acc,
                                                  k_width=2))


@gluon.jit
def _issue_scores(sm, t, k_w, v_w, s_zero):
    """S^T = K Q^T and dP^T = V dO^T of step t, async, as soon as its Q and dO have landed."""
    slot = t % STAGES
    phase = (t // STAGES) & 1
    mbarrier.wait(sm.q_full.index(slot), phase)
    s_t = warpgroup_mma(k_w, sm.q.index(slot).permute((1, 0)), s_zero, use_acc=False,
                        is_async=True)
    mbarrier.wait(sm.do_full.index(slot), phase)
    dp_t = warpgroup_mma(v_w, sm.do.index(slot).permute((1, 0)), s_zero, use_acc=False,
                         is_async=True)
    return s_t, dp_t


@gluon.jit
def _step(wg: gl.constexpr, sm, t, s_t, dp_t, dk, dv, lse2_ptr, delta_ptr, b, h0, key0, N, M,
          H, NP, lo, n_steps, qk_scale, k_cols, dq_zero, lay, shape, MASK: gl.constexpr):
    """Step t from its issued S^T and dP^T: issues dV, dK and dQ (async); returns their
    accumulators. MASK: 0 none, 1 apply the masks, 2 apply them where this step needs them
    (keys past M, or causal and keys past a query row's diagonal)."""
    HALF_N: gl.constexpr = BLOCK_N // 2
    dtype: gl.constexpr = sm.q.dtype
    h = h0 + t // n_steps
    m0 = _query_block(t, lo, n_steps)
    slot = t % STAGES
    cols = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, lay.s))
    stats = (b * H + h) * NP
    lse2 = gl.load(lse2_ptr + stats + cols)  # rows past N: +inf, so P = 0 there
    delta = gl.load(delta_ptr + stats + cols)
    s_t = warpgroup_mma_wait(1, deps=(s_t,))  # dP^T may still run
    p_t = gl.exp2(s_t * qk_scale - lse2[None, :])
    # Keys past M (zeros read past the tensor's end, whose S = 0 is no P = 0) and, when
    # causal, keys after a query's diagonal get P = 0.
    crosses = key0 + HALF_N > M
    if shape.CAUSAL:
        crosses = crosses | (key0 + HALF_N - 1 > m0 + (M - N))
    if MASK == 1 or (MASK == 2 and crosses):
        keys = key0 + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, lay.s))
        keep = keys[:, None] < M
        if shape.CAUSAL:
            keep = keep & (keys[:, None] <= cols[None, :] + (M - N))
        p_t = gl.where(keep, p_t, 0.0)
    dv = warpgroup_mma(gl.convert_layout(p_t.to(dtype), lay.a), sm.do.index(slot), dv,
                       is_async=True)
    dp_t = warpgroup_mma_wait(1, deps=(dp_t,))  # dV may still run
    ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
    dk = warpgroup_mma(gl.convert_layout(ds_t, lay.a), sm.q.index(slot), dk, is_async=True)
    if shape.SPLIT_D:
        # dQ over all 128 keys needs the other warpgroup's dS^T: both write theirs, then wait.
        ds = sm.ds.index(t % 2)
        ds.slice(wg * HALF_N, HALF_N).store(ds_t)
        fence_async_shared()
        mbarrier.arrive(sm.ds_ready.index(t % 2))
        mbarrier.wait(sm.ds_ready.index(t % 2), (t // 2) & 1)
    else:
        # Small D: each warpgroup's dQ over its own 64 keys, no exchange (two reduces a tile).
        ds = sm.ds.index(wg).slice(0, HALF_N)
        ds.store(ds_t)
        fence_async_shared()
    dq = warpgroup_mma(ds.permute((1, 0)), k_cols, dq_zero, use_acc=False, is_async=True)
    return dq, dk, dv


@gluon.jit
def _add_dq(wg: gl.constexpr, sm, dq_desc, t, dq, b, h0, N, lo, n_steps, sm_scale, shape):
    """Releases step t's Q and dO slot and adds its finished dQ tile into the float32 buffer
    with TMA reduce-adds (one per DQ_BOX columns), issued from this warpgroup's staging tile."""
    slot = t % STAGES
    mbarrier.arrive(sm.q_empty.index(slot))
    mbarrier.arrive(sm.do_empty.index(slot))
    h = h0 + t // n_steps
    m0 = _query_block(t, lo, n_steps)
    tile = sm.dq.index(wg)
    tma.store_wait(0)  # the previous step's reduces have read the tile
    tile.store(dq * sm_scale)
    fence_async_shared()
    col = h * shape.HEAD_DIM
    if shape.SPLIT_D:
        col += wg * shape.DQ_COLS
    for c in gl.static_range(0, shape.DQ_COLS, DQ_BOX):
        _tma_reduce_add(dq_desc, [b * N + m0, col + c], tile.slice(c, DQ_BOX, dim=1))


@gluon.jit
def _consumer_step(wg: gl.constexpr, sm, t, dk, dv, k_w, v_w, s_zero, lse2_ptr, delta_ptr,
                   dq_desc, b, h0, key0, N, M, H, NP, lo, n_steps, qk_scale, sm_scale, k_cols,
                   dq_zero, lay, shape, MASK: gl.constexpr):
    s_t, dp_t = _issue_scores(sm, t, k_w, v_w, s_zero)
    dq, dk, dv = _step(wg, sm, t, s_t, dp_t, dk, dv, lse2_ptr, delta_ptr, b, h0, key0, N, M, H,
                       NP, lo, n_steps, qk_scale, k_cols, dq_zero, lay, shape, MASK)
    # Issuing the next step's S^T here, before dQ's hand-over, measured 25% slower.
    dq, dk, dv = warpgroup_mma_wait(0, deps=(dq, dk, dv))
    _add_dq(wg, sm, dq_desc, t, dq, b, h0, N, lo, n_steps, sm_scale, shape)
    return warpgroup_mma_init(dk), warpgroup_mma_init(dv)


@gluon.jit
def _consumer(wg: gl.constexpr, sm, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, b, h0, hk,
              start_n, N, M, H, NP, lo, n_steps, steps, qk_scale, sm_scale, sdk_b, sdk_n,
              sdk_h, shape):
    HEAD_DIM: gl.constexpr = shape.HEAD_DIM
    HALF_N: gl.constexpr = BLOCK_N // 2
    dtype: gl.constexpr = sm.q.dtype
    DQ_COLS: gl.constexpr = shape.DQ_COLS
    lay = _Layouts(HEAD_DIM, DQ_COLS)
    key0 = start_n + wg * HALF_N
    k_w = sm.k.slice(wg * HALF_N, HALF_N)
    v_w = sm.v.slice(wg * HALF_N, HALF_N)
    k_cols = sm.k.slice(wg * DQ_COLS, DQ_COLS, dim=1) if shape.SPLIT_D else k_w
    dq_zero = gl.zeros([BLOCK_M, DQ_COLS], gl.float32, layout=lay.dq)
    dk = warpgroup_mma_init(gl.zeros([HALF_N, HEAD_DIM], gl.float32, layout=lay.acc))
    dv = warpgroup_mma_init(gl.zeros([HALF_N, HEAD_DIM], gl.float32, layout=lay.acc))
    s_zero = gl.zeros([HALF_N, BLOCK_M], gl.float32, layout=lay.s)
    mbarrier.wait(sm.kv_bar, 0)
    if shape.PEEL:
        # This warpgroup's masked steps (per query head) come first: its keys' diagonal
        # blocks, or every block where its keys pass M. The unmasked loop then carries no mask
        # code: with it, the kernel spilled more (236 bytes a thread against 96) and ran 0.76x
        # cuDNN at N=16384, against 0.87x peeled (H100, D=128).
        diag_end = key0 + HALF_N - 1 - (M - N)  # the first query row seeing all these keys
        n_masked = gl.minimum(gl.maximum(gl.cdiv(diag_end - lo, BLOCK_M), 0), n_steps)
        if key0 + HALF_N > M:
            n_masked = n_steps
        for g in range(gl.cdiv(steps, gl.maximum(n_steps, 1))):
            for j in range(n_masked):
                dk, dv = _consumer_step(wg, sm, g * n_steps + j, dk, dv, k_w, v_w, s_zero,
                                        lse2_ptr, delta_ptr, dq_desc, b, h0, key0, N, M, H, NP,
                                        lo, n_steps, qk_scale, sm_scale, k_cols, dq_zero, lay,
                                        shape, 1)
            for j in range(n_masked, n_steps):
                dk, dv = _consumer_step(wg, sm, g * n_steps + j, dk, dv, k_w, v_w, s_zero,
                                        lse2_ptr, delta_ptr, dq_desc, b, h0, key0, N, M, H, NP,
                                        lo, n_steps, qk_scale, sm_scale, k_cols, dq_zero, lay,
                                        shape, 0)
    else:
        # One loop (non-causal, and causal at head sizes not in PEELED_HEAD_SIZES): peeled,
        # the non-causal D=64 backward ran 0.71-0.78x cuDNN, not 0.79-0.85x.
        for t in range(steps):
            dk, dv = _consumer_step(wg, sm, t, dk, dv, k_w, v_w, s_zero, lse2_ptr, delta_ptr,
                                    dq_desc, b, h0, key0, N, M, H, NP, lo, n_steps, qk_scale,
                                    sm_scale, k_cols, dq_zero, lay, shape, 2)
    dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
    tma.store_wait(0)
    rows_o = key0 + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, lay.acc))
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, lay.acc))
    offs = b * sdk_b + hk * sdk_h + rows_o[:, None] * sdk_n + cols_o[None, :]
    keep = (rows_o < M)[:, None]
    gl.store(dk_ptr + offs, (dk * sm_scale).to(dtype), mask=keep)
    gl.store(dv_ptr + offs, dv.to(dtype), mask=keep)


@gluon.jit
def _consumer0(sm, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, b, h0, hk, start_n, N, M, H, NP,
               lo, n_steps, steps, qk_scale, sm_scale, sdk_b, sdk_n, sdk_h, shape):
    _consumer(0, sm, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, b, h0, hk, start_n, N, M, H,
              NP, lo, n_steps, steps, qk_scale, sm_scale, sdk_b, sdk_n, sdk_h, shape)


@gluon.jit
def _consumer1(sm, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, b, h0, hk, start_n, N, M, H, NP,
               lo, n_steps, steps, qk_scale, sm_scale, sdk_b, sdk_n, sdk_h, shape):
    _consumer(1, sm, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, b, h0, hk, start_n, N, M, H,
              NP, lo, n_steps, steps, qk_scale, sm_scale, sdk_b, sdk_n, sdk_h, shape)


@gluon.jit(do_not_specialize=["N", "M", "NP", "HEAD_GROUP"])
def _bwd_kernel(q_desc, k_desc, v_desc, do_desc, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr,
                N, M, H, HKV, NP, HEAD_GROUP, qk_scale, sm_scale, sdk_b, sdk_n, sdk_h,
                HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, PEEL: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    # Key blocks over groups of HEAD_GROUP kv heads, block 0 (the heaviest when causal) first.
    i, bhk = grouped_program(gl.cdiv(M, BLOCK_N), HEAD_GROUP)
    start_n = i * BLOCK_N
    b = bhk // HKV
    hk = bhk % HKV
    n_group = H // HKV
    lo = 0
    if CAUSAL:
        lo = (gl.maximum(start_n - (M - N), 0) // BLOCK_M) * BLOCK_M
    n_steps = gl.maximum(gl.cdiv(N, BLOCK_M) - lo // BLOCK_M, 0)
    steps = n_steps * n_group

    shape = _Shape(HEAD_DIM, CAUSAL, PEEL)
    barrier: gl.constexpr = mbarrier.MBarrierLayout()
    sm = _Smem(gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout),
               gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout),
               gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout),
               gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout),
               gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M],
                                         gl.NVMMASharedLayout.get_default_for(
                                             [BLOCK_N, BLOCK_M], dtype)),
               gl.allocate_shared_memory(gl.int64, [1], barrier),
               gl.allocate_shared_memory(gl.int64, [STAGES, 1], barrier),
               gl.allocate_shared_memory(gl.int64, [STAGES, 1], barrier),
               gl.allocate_shared_memory(gl.int64, [STAGES, 1], barrier),
               gl.allocate_shared_memory(gl.int64, [STAGES, 1], barrier),
               gl.allocate_shared_memory(gl.int64, [2, 1], barrier),
               gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, shape.DQ_COLS],
                                         dq_desc.layout))
    mbarrier.init(sm.kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(sm.q_full.index(i), count=1)
        mbarrier.init(sm.do_full.index(i), count=1)
        mbarrier.init(sm.q_empty.index(i), count=2)  # one arrival per consumer
        mbarrier.init(sm.do_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(sm.ds_ready.index(i), count=2)
    h0 = hk * n_group
    consumer_args = (sm, lse2_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr, b, h0, hk, start_n, N,
                     M, H, NP, lo, n_steps, steps, qk_scale, sm_scale, sdk_b, sdk_n, sdk_h,
                     shape)
    producer_args = (q_desc, k_desc, v_desc, do_desc, sm, b, h0, hk, start_n, N, M, lo,
                     n_steps, steps, shape)
    gl.warp_specialize([(_consumer0, consumer_args), (_consumer1, consumer_args),
                        (_producer, producer_args)], [4, 1], [CONSUMER_REGS, 24])


_DQ_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
           dk: torch.Tensor, dv: torch.Tensor, lse2: torch.Tensor) -> bool:
    """Whether this backward serves these tensors (else the caller runs its Triton kernels).

    Tensors are read as 2D [B * rows, heads * D], so with B > 1 a tile must not cross into
    the next batch's rows (their values, inf included, would reach this batch's dK and dV):
    hence N % 64 == 0 and M % 128 == 0 where B > 1."""
    b, n, _, d = q.shape
    return (device_reason(q) is None
            and q.dtype in (torch.float16, torch.bfloat16) and d in SUPPORTED_HEAD_SIZES
            and all(tma_readable(t) for t in (q, k, v, dout))
            and (b == 1 or (n % BLOCK_M.value == 0 and k.shape[1] % BLOCK_N.value == 0))
            and dk.is_contiguous() and dv.is_contiguous() and dk.numel() < 2**31
            and lse2.shape[2] % BLOCK_M.value == 0)


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
             lse2: torch.Tensor, delta: torch.Tensor, causal: bool, scale: float,
             dq_acc: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
             head_group: int = 1) -> None:
    """Adds dQ into dq_acc ([B, N, H, D] float32, contiguous, zeroed) and writes dk, dv
    (contiguous, like k); lse2, delta [B, H, NP]; `usable` must hold."""
    b, n, h, d = q.shape
    m, hkv = k.shape[1], k.shape[2]
    grid = (cdiv(m, BLOCK_N.value) * b * hkv,)
    # dQ is added in [64 rows, DQ_BOX columns] boxes; rows past B * N are clipped by the
    # descriptor.
    dq_desc = TensorDescriptor(dq_acc, [b * n, h * d], [h * d, 1],
                               [BLOCK_M.value, DQ_BOX.value], _DQ_LAYOUT)
    launch(_bwd_kernel, grid,
           (tma_descriptor(q, BLOCK_M.value), tma_descriptor(k, BLOCK_N.value),
            tma_descriptor(v, BLOCK_N.value), tma_descriptor(dout, BLOCK_M.value),
            lse2, delta, dq_desc, dk, dv, n, m, h, hkv, lse2.shape[2], head_group,
            scale * 1.4426950408889634, scale, dk.stride(0), dk.stride(1), dk.stride(2)),
           {"HEAD_DIM": d, "CAUSAL": causal, "PEEL": d in PEELED_HEAD_SIZES, "num_warps": 4})
