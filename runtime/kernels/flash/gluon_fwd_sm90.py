"""TRITON_FLASH_ATTN's forward on Hopper in Gluon: warp-specialized, with warpgroup ping-pong.

Triton 3.6 cannot overlap the softmax with tensor-core work on sm90 (it waits for every score
product right after issuing it; bench/NOTES-triton-flash.md), which left the Triton forward at
0.7-0.85x cuDNN at D=128. Gluon states the schedule explicitly. One program takes 128 query
rows of one (batch, head):

    producer   one warp: Q once, then K and V tiles by TMA into 2-slot rings; a slot is
               refilled when both consumers have released it (full/empty mbarriers)
    consumer   two warpgroups of 64 query rows each. In its turn a warpgroup issues
    0 and 1    S_j = Q K_j^T and P_{j-1} V_{j-1} (async wgmma), hands the turn to the other
               warpgroup, then waits for S_j and runs softmax j while the other one's products
               run (the FlashAttention-3 ping-pong); O is rescaled once P_{j-1} V_{j-1} is done

Same contract as triton_flash._forward: q [B, N, H, D], k, v [B, M, Hkv, D] (GQA by head
index), bottom-right causal masks, out [B, N, H, D] and lse [B, H, N] (natural log; -inf and a
zero row for a query that sees no key). It runs where `usable` says so: an sm90 GPU (not ROCm),
fp16 or bf16, D in SUPPORTED_HEAD_SIZES, q, k, v readable as 2D TMA tensors, and K/V tiles that
stay within one batch; triton_flash takes its Triton kernel elsewhere (the same computation),
and also after a compile failure here. Written against Triton 3.6 (the GPU machine's); checked
against float64 in tests/kernels (GPU).

No `from __future__ import annotations` here: Gluon's aggregate checks field annotations as
real types.
"""

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

from attnrt.kernels import cdiv
from attnrt.kernels.fast_launch import launch
from attnrt.kernels.gluon_compat import tma_load as _tma_load
from attnrt.kernels.gluon_host import device_reason, tma_readable

SUPPORTED_HEAD_SIZES = (64, 128)
BLOCK_M = gl.constexpr(128)  # two consumer warpgroups of 64 rows
STAGES = gl.constexpr(2)  # K and V ring slots (measured on H100: 3 K slots gained nothing)
CONSUMER_REGS = gl.constexpr(240)  # per consumer thread (setmaxnreg); the producer warp has 24
LOG2E = gl.constexpr(1.4426950408889634)


@aggregate
class _Shape:
    """Compile-time parameters every partition needs (plain arguments would reach the
    partitions as runtime values)."""

    HEAD_DIM: gl.constexpr
    BLOCK_N: gl.constexpr
    CAUSAL: gl.constexpr
    MASK: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, HEAD_DIM, BLOCK_N, CAUSAL, MASK):  # noqa: N803 (constexpr names)
        self.HEAD_DIM = gl.constexpr(HEAD_DIM)
        self.BLOCK_N = gl.constexpr(BLOCK_N)
        self.CAUSAL = gl.constexpr(CAUSAL)
        self.MASK = gl.constexpr(MASK)


@aggregate
class _Smem:
    """Shared buffers and barriers: Q halves, K and V rings, full/empty barriers, turns."""

    q: gl.shared_memory_descriptor
    k: gl.shared_memory_descriptor
    v: gl.shared_memory_descriptor
    q_bar: gl.shared_memory_descriptor
    k_full: gl.shared_memory_descriptor
    k_empty: gl.shared_memory_descriptor
    v_full: gl.shared_memory_descriptor
    v_empty: gl.shared_memory_descriptor
    turn: gl.shared_memory_descriptor

    @gluon.constexpr_function
    def __init__(self, q, k, v, q_bar, k_full, k_empty, v_full, v_empty, turn):
        self.q, self.k, self.v, self.q_bar = q, k, v, q_bar
        self.k_full, self.k_empty, self.v_full, self.v_empty = k_full, k_empty, v_full, v_empty
        self.turn = turn


@gluon.jit
def allocate_rings(dtype: gl.constexpr, q_desc, k_desc, v_desc, slots: gl.constexpr,
                   readers: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                   HEAD_DIM_V: gl.constexpr):
    """The Q halves, K and V rings of `slots` slots (each slot released by `readers`
    consumers), their full/empty barriers and the two turn barriers: what the dense,
    block-sparse and engine Gluon forwards share."""
    barrier: gl.constexpr = mbarrier.MBarrierLayout()
    sm = _Smem(gl.allocate_shared_memory(dtype, [2, BLOCK_M // 2, HEAD_DIM], q_desc.layout),
               gl.allocate_shared_memory(dtype, [slots, BLOCK_N, HEAD_DIM], k_desc.layout),
               gl.allocate_shared_memory(dtype, [slots, BLOCK_N, HEAD_DIM_V], v_desc.layout),
               gl.allocate_shared_memory(gl.int64, [1], barrier),
               gl.allocate_shared_memory(gl.int64, [slots, 1], barrier),
               gl.allocate_shared_memory(gl.int64, [slots, 1], barrier),
               gl.allocate_shared_memory(gl.int64, [slots, 1], barrier),
               gl.allocate_shared_memory(gl.int64, [slots, 1], barrier),
               gl.allocate_shared_memory(gl.int64, [2, 1], barrier))
    mbarrier.init(sm.q_bar, count=1)
    for i in gl.static_range(slots):
        mbarrier.init(sm.k_full.index(i), count=1)
        mbarrier.init(sm.v_full.index(i), count=1)
        mbarrier.init(sm.k_empty.index(i), count=readers)
        mbarrier.init(sm.v_empty.index(i), count=readers)
    for i in gl.static_range(2):
        mbarrier.init(sm.turn.index(i), count=1)
    return sm


@gluon.jit
def load_q(q_desc, sm, q_row, q_col):
    """Both Q halves of the program's 128 rows, on sm.q_bar."""
    mbarrier.expect(sm.q_bar, 2 * q_desc.block_type.nbytes)
    for half in gl.static_range(2):
        _tma_load(q_desc, [q_row + half * (BLOCK_M // 2), q_col], sm.q_bar, sm.q.index(half))


@gluon.jit
def load_kv(k_desc, v_desc, sm, slot, lap, row, k_col, v_col):
    """K and V rows [row, row + BLOCK_N) into ring slot `slot` on its `lap`-th use, once its
    consumers released the previous tile there."""
    free = (lap & 1) ^ 1  # a fresh barrier passes the wait for parity 1
    mbarrier.wait(sm.k_empty.index(slot), free)
    mbarrier.expect(sm.k_full.index(slot), k_desc.block_type.nbytes)
    _tma_load(k_desc, [row, k_col], sm.k_full.index(slot), sm.k.index(slot))
    mbarrier.wait(sm.v_empty.index(slot), free)
    mbarrier.expect(sm.v_full.index(slot), v_desc.block_type.nbytes)
    _tma_load(v_desc, [row, v_col], sm.v_full.index(slot), sm.v.index(slot))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, sm, q_row, q_col, kv_row, kv_col, n_tiles, shape):
    load_q(q_desc, sm, q_row, q_col)
    for j in range(n_tiles):
        load_kv(k_desc, v_desc, sm, j % STAGES, j // STAGES, kv_row + j * shape.BLOCK_N,
                kv_col, kv_col)


@gluon.jit
def _softmax(s, m_i, l_i, tile, rows, row0, qk_scale, N, M, shape, col_layout: gl.constexpr):
    """Online softmax of one score tile in base 2: (p, alpha, new max, new sum)."""
    BLOCK_N: gl.constexpr = shape.BLOCK_N
    s = s * qk_scale
    if shape.MASK:
        end = tile * BLOCK_N + BLOCK_N
        crosses = end > M  # the last tile of a length that BLOCK_N does not divide
        if shape.CAUSAL:
            crosses = crosses | (end - 1 > row0 + (M - N))
        if crosses:
            cols = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_layout)
            valid = cols[None, :] < M
            if shape.CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + (M - N))
            s = gl.where(valid, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(s - m_use[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _consumer(wg: gl.constexpr, sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, n_tiles,
              so_b, so_n, so_h, shape):
    HEAD_DIM: gl.constexpr = shape.HEAD_DIM
    BLOCK_N: gl.constexpr = shape.BLOCK_N
    HALF: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = sm.q.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    row0 = m0 + wg * HALF
    rows = row0 + gl.arange(0, HALF, layout=row_s)
    m_i = gl.full([HALF], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([HALF], gl.float32, layout=row_s)
    acc = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)
    q = sm.q.index(wg)
    mbarrier.wait(sm.q_bar, 0)
    if n_tiles > 0:
        # Turn k of this warpgroup: warpgroup 0 goes first, then they alternate.
        mbarrier.wait(sm.turn.index(wg), 1 - wg)
        mbarrier.wait(sm.k_full.index(0), 0)
        s = warpgroup_mma(q, sm.k.index(0).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        mbarrier.arrive(sm.turn.index(1 - wg))
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(sm.k_empty.index(0))
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, 0, rows, row0, qk_scale, N, M, shape,
                                      gl.SliceLayout(0, s_layout))
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma_init(acc)
        for j in range(1, n_tiles):
            slot, prev = j % STAGES, (j - 1) % STAGES
            mbarrier.wait(sm.turn.index(wg), (j & 1) ^ (1 - wg))
            mbarrier.wait(sm.k_full.index(slot), (j // STAGES) & 1)
            s = warpgroup_mma(q, sm.k.index(slot).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
            mbarrier.wait(sm.v_full.index(prev), ((j - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, sm.v.index(prev), acc, is_async=True)
            mbarrier.arrive(sm.turn.index(1 - wg))
            s = warpgroup_mma_wait(1, deps=(s,))  # S_j done; P_{j-1} V_{j-1} may still run
            mbarrier.arrive(sm.k_empty.index(slot))
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, j, rows, row0, qk_scale, N, M, shape,
                                          gl.SliceLayout(0, s_layout))
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(sm.v_empty.index(prev))
            acc = warpgroup_mma_init(acc * gl.convert_layout(alpha, row_o)[:, None])
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        last = (n_tiles - 1) % STAGES
        mbarrier.wait(sm.turn.index(wg), (n_tiles & 1) ^ (1 - wg))
        mbarrier.wait(sm.v_full.index(last), ((n_tiles - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, sm.v.index(last), acc, is_async=True)
        mbarrier.arrive(sm.turn.index(1 - wg))
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(sm.v_empty.index(last))
    _store(acc, m_i, l_i, o_ptr, lse_ptr, N, b, h, bh, row0, rows, so_b, so_n, so_h, o_layout,
           dtype, HEAD_DIM)


@gluon.jit
def _store(acc, m_i, l_i, o_ptr, lse_ptr, N, b, h, bh, row0, rows, so_b, so_n, so_h,
           o_layout: gl.constexpr, dtype: gl.constexpr, HEAD_DIM: gl.constexpr):
    """A warpgroup's epilogue: out = acc / l (0 for a row that saw no key), lse in natural log
    (-inf there); rows past N are not written."""
    HALF: gl.constexpr = BLOCK_M // 2
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.convert_layout(l_safe, row_o)[:, None]
    rows_o = row0 + gl.arange(0, HALF, layout=row_o)
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    ptrs = o_ptr + b * so_b + h * so_h + rows_o[:, None] * so_n + cols_o[None, :]
    gl.store(ptrs, out.to(dtype), mask=(rows_o < N)[:, None])
    lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) / LOG2E)
    gl.store(lse_ptr + bh * N + rows, lse, mask=rows < N)


@gluon.jit
def _consumer0(sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, n_tiles, so_b, so_n, so_h,
               shape):
    _consumer(0, sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, n_tiles, so_b, so_n, so_h,
              shape)


@gluon.jit
def _consumer1(sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, n_tiles, so_b, so_n, so_h,
               shape):
    _consumer(1, sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, n_tiles, so_b, so_n, so_h,
              shape)


@gluon.jit
def grouped_program(per_head, HEAD_GROUP):
    """(block within its head, head) of this program of a 1D grid of per_head programs per
    head: attnrt.kernels.flash.jit._grouped_program's order (heads in groups of
    HEAD_GROUP; block i of every head of a group before block i + 1 of any), for the Gluon
    kernels (the backward's too)."""
    pid = gl.program_id(0)
    group = pid // (HEAD_GROUP * per_head)
    rank = pid - group * HEAD_GROUP * per_head
    size = gl.minimum(HEAD_GROUP, gl.num_programs(0) // per_head - group * HEAD_GROUP)
    return rank // size, group * HEAD_GROUP + rank % size


@gluon.jit(do_not_specialize=["HEAD_GROUP"])
def _fwd_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, N, M, H, GROUP, HEAD_GROUP, qk_scale,
                so_b, so_n, so_h, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                CAUSAL: gl.constexpr, MASK: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    n_m = gl.cdiv(N, BLOCK_M)
    i, bh = grouped_program(n_m, HEAD_GROUP)
    m0 = (n_m - 1 - i) * BLOCK_M  # program 0: the last row block, the heaviest when causal
    b = bh // H
    h = bh % H
    hi = M
    if CAUSAL:
        hi = gl.minimum(M, gl.maximum(m0 + BLOCK_M + M - N, 0))
    n_tiles = gl.cdiv(hi, BLOCK_N)

    sm = allocate_rings(dtype, q_desc, k_desc, v_desc, STAGES, 2, BLOCK_N, HEAD_DIM, HEAD_DIM)
    shape = _Shape(HEAD_DIM, BLOCK_N, CAUSAL, MASK)
    consumer_args = (sm, o_ptr, lse_ptr, N, M, qk_scale, b, h, bh, m0, n_tiles, so_b, so_n,
                     so_h, shape)
    producer_args = (q_desc, k_desc, v_desc, sm, b * N + m0, h * HEAD_DIM, b * M,
                     (h // GROUP) * HEAD_DIM, n_tiles, shape)
    gl.warp_specialize([(_consumer0, consumer_args), (_consumer1, consumer_args),
                        (_producer, producer_args)], [4, 1], [CONSUMER_REGS, 24])


def tma_descriptor(t: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """[B, L, Hx, D] as the 2D TMA tensor [B * L, Hx * D], tiles of [block_rows, D] (the
    backward, gluon_bwd_sm90, reads its tensors this way too)."""
    b, rows, hx, d = t.shape
    return TensorDescriptor(t, [b * rows, hx * d], [t.stride(1), 1], [block_rows, d],
                            _smem_layout(block_rows, d, t.dtype))


@functools.cache
def _smem_layout(block_rows: int, d: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for([block_rows, d], gl_dtype)


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
           block_n: int) -> bool:
    """Whether this forward serves these tensors (else the caller takes its Triton kernel).

    K and V are read as one 2D tensor over all batches, so with B > 1 a tile must not cross
    into the next batch's rows: masked scores give P = 0 there, but 0 * inf in the next
    batch's V would still be NaN. Hence M % block_n == 0 where B > 1."""
    b, _, h, d = q.shape
    return (device_reason(q) is None
            and q.dtype in (torch.float16, torch.bfloat16) and d in SUPPORTED_HEAD_SIZES
            and all(tma_readable(t) for t in (q, k, v))
            and (b == 1 or k.shape[1] % block_n == 0)
            and out.stride(3) == 1 and out.numel() < 2**31)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
            block_n: int, out: torch.Tensor, lse: torch.Tensor, head_group: int = 1,
            key: tuple | None = None) -> None:
    """Writes out [B, N, H, D] and lse [B, H, N] (float32, contiguous); `usable` must hold.
    head_group: heads whose row blocks interleave, heaviest first (see _fwd_kernel). key: what
    decides this launch's specialization, where the caller knows (fast_launch.launch)."""
    b, n, h, d = q.shape
    m, hkv = k.shape[1], k.shape[2]
    grid = (cdiv(n, BLOCK_M.value) * b * h,)
    launch(_fwd_kernel, grid,
           (tma_descriptor(q, BLOCK_M.value // 2), tma_descriptor(k, block_n),
            tma_descriptor(v, block_n), out, lse, n, m, h, h // hkv, head_group,
            scale * LOG2E.value, out.stride(0), out.stride(1), out.stride(2)),
           {"HEAD_DIM": d, "BLOCK_N": block_n, "CAUSAL": causal,
            "MASK": causal or m % block_n != 0, "num_warps": 4}, key)
