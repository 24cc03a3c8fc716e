"""Device code of VSA's coarse stage (host side: vsa_pool.py): the mean of each 64-slot cube
of q, k and v in one pass, one launch.

Shapes: X [B, S, Hx, D] (S = 64 * C slots, padding slots zero), SIZES int32 [C] valid tokens
per cube, OUT float32 [B, C, H + 2 * Hkv, D]: q's heads, then k's, then v's.
"""

import triton
import triton.language as tl


@triton.jit
def _pool_kernel(Q, K, V, SIZES, OUT, sq, sk, so, H, HKV, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, CUBE: tl.constexpr):
    """One program per (cube, batch * (H + 2 * Hkv)): sums the cube's CUBE slots of one head
    in float32 and divides by its valid count. k and v share their strides (sk); the head
    dimension is contiguous in all three."""
    c = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    hs = H + 2 * HKV
    b = (j // hs).to(tl.int64)
    hh = j % hs
    rows = c * CUBE + tl.arange(0, CUBE)
    cols = tl.arange(0, BLOCK_D)
    if hh < H:
        base = Q + b * sq[0] + hh.to(tl.int64) * sq[2] + rows[:, None] * sq[1]
    elif hh < H + HKV:
        base = K + b * sk[0] + (hh - H).to(tl.int64) * sk[2] + rows[:, None] * sk[1]
    else:
        base = V + b * sk[0] + (hh - H - HKV).to(tl.int64) * sk[2] + rows[:, None] * sk[1]
    x = tl.load(base + cols[None, :], mask=cols[None, :] < HEAD_DIM, other=0.0)
    mean = tl.sum(x.to(tl.float32), 0) / tl.load(SIZES + c).to(tl.float32)
    out = OUT + b * so[0] + c * so[1] + hh.to(tl.int64) * so[2] + cols
    tl.store(out, mean, mask=cols < HEAD_DIM)
