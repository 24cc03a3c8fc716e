"""Host side of the block-sparse flash kernel: launches, the transposed block lists of the
backward, and the autograd Function. Imports Triton; reached only through api.py.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size,
NQB = ceil(N / block_q), NKB = ceil(M / block_k), MAXK the length of each block list.
"""

from __future__ import annotations

import math

import torch

from .. import cdiv, next_power_of_2
from .jit import _compact_kernel, _dkdv_kernel, _dq_kernel, _fwd_kernel
from .reference import index_to_block_mask

LOG2E = 1.4426950408889634
_COMPACT_CHUNK = 256


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here, so tests can poison it with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


# Launch options per "<kernel>-<block_q>x<block_k>-d<64|128|256>" (kernel: fwd, dq, dkdv);
# bench/sparse_gpu.py --sweep measures candidates and prints entries to ship here. Unlisted
# keys take _default_options.
LAUNCH_OPTIONS: dict[str, dict[str, int]] = {}


def _d_bucket(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256


def _default_options(kernel: str, block_q: int, block_k: int, d: int) -> dict[str, int]:
    """One warpgroup for 64-row tiles, two for 128x128 or D=256; fewer pipeline stages where
    the tiles (and dK/dV's register accumulators) are large."""
    warps = 8 if block_q * block_k >= 128 * 128 or d > 128 else 4
    stages = 3 if d <= 128 else 1
    if kernel == "dkdv":
        stages = min(stages, 2)
    return {"num_warps": warps, "num_stages": stages}


def _launch_options(kernel: str, block_q: int, block_k: int, d: int,
                    device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {"num_warps": 4, "num_stages": 1}
    key = f"{kernel}-{block_q}x{block_k}-d{_d_bucket(d)}"
    return LAUNCH_OPTIONS.get(key) or _default_options(kernel, block_q, block_k, d)


def _consts(q: torch.Tensor, block_q: int, block_k: int, has_valid: bool) -> dict:
    d = q.shape[-1]
    return {"HEAD_DIM": d, "BLOCK_D": max(16, next_power_of_2(d)), "BLOCK_Q": block_q,
            "BLOCK_K": block_k, "HAS_VALID": has_valid,
            "PREC": "ieee" if q.dtype == torch.float32 else "tf32"}


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether a row offset within one (batch, head) can pass int32."""
    return any(t.shape[1] * t.stride(1) >= 2**31 for t in tensors)


def _forward(q, k, v, index, count, valid, block_q, block_k, scale):
    b, n, h, _ = q.shape
    out = _alloc(tuple(q.shape), q.dtype, q.device)
    lse = _alloc((b, h, n), torch.float32, q.device)
    grid = (cdiv(n, block_q), b * h)
    _fwd_kernel[grid](
        q, k, v, out, lse, index, count, valid if valid is not None else count,
        q.stride(), k.stride(), v.stride(), out.stride(), index.stride(), count.stride(),
        n, k.shape[1], h, h // k.shape[2], scale * LOG2E,
        INT64=_needs_int64(q, k, v, out), **_consts(q, block_q, block_k, valid is not None),
        **_launch_options("fwd", block_q, block_k, q.shape[-1], q.device))
    return out, lse


def transpose_lists(index: torch.Tensor, count: torch.Tensor, num_key_blocks: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block, the query blocks that visit it: (k2q int32 [B, H, NKB, NQB], k2q_count
    int32 [B, H, NKB]), entries in increasing order, built on the device without a host sync."""
    b, h, nqb, _ = index.shape
    mask = index_to_block_mask(index, count, num_key_blocks).view(torch.int8)
    mask = mask.reshape(b * h, nqb, num_key_blocks)
    k2q = torch.empty((b, h, num_key_blocks, nqb), dtype=torch.int32, device=index.device)
    k2q_count = torch.empty((b, h, num_key_blocks), dtype=torch.int32, device=index.device)
    chunk = min(_COMPACT_CHUNK, max(16, next_power_of_2(nqb)))
    _compact_kernel[(num_key_blocks, b * h)](mask, k2q, k2q_count, mask.stride(0),
                                             mask.stride(2), mask.stride(1), nqb, CHUNK=chunk)
    return k2q, k2q_count


def _row_terms(out, dout, lse, dlse, np_rows):
    """delta = rowsum(dO * O) - dlse and lse in log2 units, both [B, H, NP] float32, padded
    past N with delta = 0 and lse2 = +inf (so p = 0 there); lse = -inf also becomes +inf."""
    b, n, h, _ = out.shape
    delta = torch.zeros((b, h, np_rows), dtype=torch.float32, device=out.device)
    lse2 = torch.full((b, h, np_rows), float("inf"), dtype=torch.float32, device=out.device)
    rows = (out.float() * dout.float()).sum(-1).transpose(1, 2)
    if dlse is not None:
        rows = rows - dlse.float()
    delta[:, :, :n] = rows
    lse2[:, :, :n] = torch.where(torch.isneginf(lse), float("inf"), lse * LOG2E)
    return delta, lse2


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, index, count, valid = ctx.saved_tensors
    block_q, block_k, scale = ctx.block_q, ctx.block_k, ctx.scale
    b, n, h, _ = q.shape
    m, hkv = k.shape[1], k.shape[2]
    nqb, nkb = cdiv(n, block_q), cdiv(m, block_k)
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    delta, lse2 = _row_terms(out, dout, lse, dlse, nqb * block_q)
    dq = _alloc(tuple(q.shape), q.dtype, q.device)
    dk = _alloc(tuple(k.shape), k.dtype, k.device)
    dv = _alloc(tuple(v.shape), v.dtype, v.device)
    consts = _consts(q, block_q, block_k, valid is not None)
    d = q.shape[-1]
    int64 = _needs_int64(q, k, v, dout, dq, dk, dv)
    has_valid = valid if valid is not None else count
    _dq_kernel[(nqb, b * h)](
        q, k, v, dout, dq, lse2, delta, index, count, has_valid, q.stride(), k.stride(),
        v.stride(), dout.stride(), dq.stride(), index.stride(), count.stride(), n, m,
        nqb * block_q, h, h // hkv, scale * LOG2E, scale, INT64=int64, **consts,
        **_launch_options("dq", block_q, block_k, d, q.device))
    k2q, k2q_count = transpose_lists(index, count, nkb)
    _dkdv_kernel[(nkb, b * hkv)](
        q, k, v, dout, dk, dv, lse2, delta, k2q, k2q_count, has_valid, q.stride(), k.stride(),
        v.stride(), dout.stride(), dk.stride(), dv.stride(), n, m, nqb * block_q, h, hkv,
        h // hkv, nqb, nkb, scale * LOG2E, scale, INT64=int64, **consts,
        **_launch_options("dkdv", block_q, block_k, d, q.device))
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index, count, valid, block_q, block_k, scale):
        out, lse = _forward(q, k, v, index, count, valid, block_q, block_k, scale)
        ctx.save_for_backward(q, k, v, out, lse, index, count, valid)
        ctx.block_q, ctx.block_k, ctx.scale = block_q, block_k, scale
        ctx.set_materialize_grads(False)  # an unused lse sends None, not a zero tensor
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv = _backward(ctx, dout, dlse)
        return dq, dk, dv, None, None, None, None, None, None


def run(q, k, v, index, count, valid, block_q, block_k, softmax_scale):
    """Checked inputs -> (out, lse) through the autograd Function."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = (t.contiguous() for t in (q, k, v))
    return _BlockSparseAttention.apply(q, k, v, index, count, valid, block_q, block_k, scale)
