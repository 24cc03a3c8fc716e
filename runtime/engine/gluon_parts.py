"""The fixed parts of the engine's Gluon sm90 forward (the generated consumer is in
engine/gluon_codegen.py): compile-time parameters, shared buffers, the producer warp walking
the engine's two block lists, and the launch.

Shapes: q [B, N, H, D], k [B, M, Hkv, D], v [B, M, Hkv, Dv]; out [B, N, H, Dv]; final row
scales FIN [R, B*H, N] float32; block lists idx int32 [Bm, Hm, NQB, K], cnt int32 [Bm, Hm, NQB]
of (128-row, BLOCK_N-key) tiles (engine/blocks.py).

One program takes 128 query rows of one (batch, head), as the dense Gluon forward
(attnrt.kernels.flash.gluon_fwd_sm90) does: the producer warp loads the two 64-row Q halves
once, then K and V of every fully kept key block of the row block's list, then of every
partial one, by TMA into 2-slot rings; two consumer warpgroups of 64 rows run the FA3 ping-pong
over the same tiles in the same order.

Imported only where Triton has Gluon (engine/gluon_forward.py imports it on first use). No
`from __future__ import annotations`: Gluon's aggregate checks field annotations as real types.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.core import _aggregate as aggregate

from attnrt.kernels.fast_launch import launch
from attnrt.kernels.flash.gluon_fwd_sm90 import (
    BLOCK_M,
    CONSUMER_REGS,
    allocate_rings,
    load_kv,
    load_q,
    tma_descriptor,
)

HALF = gl.constexpr(64)  # query rows per consumer warpgroup
STAGES = gl.constexpr(2)  # slots per K and V ring
PRODUCER_REGS = gl.constexpr(24)


@aggregate
class Cfg:
    """Compile-time parameters every partition needs (plain arguments would reach the
    partitions as runtime values)."""

    HEAD_DIM: gl.constexpr
    HEAD_DIM_V: gl.constexpr
    BLOCK_N: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, HEAD_DIM, HEAD_DIM_V, BLOCK_N):  # noqa: N803 (constexpr names)
        self.HEAD_DIM = gl.constexpr(HEAD_DIM)
        self.HEAD_DIM_V = gl.constexpr(HEAD_DIM_V)
        self.BLOCK_N = gl.constexpr(BLOCK_N)


@gluon.jit
def producer(q_desc, k_desc, v_desc, sm, q_row, q_col, kv_row, k_col, v_col, full_row, part_row,
             n_full, n_part, cfg):
    """Q once, then the K/V tiles of the full list's key blocks, then the partial list's (tile
    t of the walk in slot t % STAGES)."""
    load_q(q_desc, sm, q_row, q_col)
    for j in range(n_full):
        load_kv(k_desc, v_desc, sm, j % STAGES, j // STAGES,
                kv_row + gl.load(full_row + j) * cfg.BLOCK_N, k_col, v_col)
    for j in range(n_part):
        t = n_full + j
        load_kv(k_desc, v_desc, sm, t % STAGES, t // STAGES,
                kv_row + gl.load(part_row + j) * cfg.BLOCK_N, k_col, v_col)


@gluon.jit
def allocate(dtype: gl.constexpr, q_desc, k_desc, v_desc, cfg):
    """Q halves, the K and V rings and their barriers (each slot released by 2 consumers)."""
    return allocate_rings(dtype, q_desc, k_desc, v_desc, STAGES, 2, cfg.BLOCK_N, cfg.HEAD_DIM,
                          cfg.HEAD_DIM_V)


def forward(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            fin: torch.Tensor, lists: tuple, inputs: list[torch.Tensor], list_strides: list[int],
            scale: float, block_n: int) -> None:
    """Launches the generated `kernel` (engine_gluon_fwd) over (row blocks of 128, B * H):
    writes out [B, N, H, Dv] and FIN [R, B*H, N]."""
    b, n, h, d = q.shape
    m, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    full_idx, full_cnt, part_idx, part_cnt = lists
    strides = [s for t in inputs for s in t.stride()]
    grid = (-(-n // BLOCK_M.value), b * h)
    launch(kernel, grid,
           (tma_descriptor(q, HALF.value), tma_descriptor(k, block_n),
            tma_descriptor(v, block_n), out, fin, full_idx, full_cnt, part_idx, part_cnt,
            *inputs, *out.stride()[:3], fin.stride(0), *list_strides, *strides, n, m, h,
            h // hkv, scale),
           {"HEAD_DIM": d, "HEAD_DIM_V": dv, "BLOCK_N": block_n, "num_warps": 4})


__all__ = ["BLOCK_M", "CONSUMER_REGS", "HALF", "PRODUCER_REGS", "STAGES", "Cfg", "allocate",
           "forward", "producer"]
