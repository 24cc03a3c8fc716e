"""Host side of the block-sparse flash kernel: launches, the transposed block lists of the
backward, and the autograd Function. Imports Triton; reached only through api.py.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size,
NQB = ceil(N / block_q), NKB = ceil(M / block_k), MAXK the length of each block list.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .. import cdiv, next_power_of_2
from . import gluon_path
from .jit import _compact_kernel, _dkdv_kernel, _dq_kernel, _fwd_kernel
from .options import KERNELS, Plan, check_fits, fitting_plans, gluon_backward_on, wanted_plan
from .reference import dense_row_mask, index_to_block_mask

LOG2E = 1.4426950408889634
_COMPACT_CHUNK = 256


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here, so tests can poison it with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


_CHOSEN: dict[tuple, Plan] = {}


def chosen_plans() -> dict[tuple, Plan]:
    """(kernel, block_q, block_k, D, dtype, device index) -> the plan that ran there."""
    return dict(_CHOSEN)


def clear_plans() -> None:
    """Forget the plans chosen per size (after LAUNCH_OPTIONS changes)."""
    _CHOSEN.clear()


@functools.lru_cache(maxsize=16)
def smem_limit(device_index: int) -> int:
    """Shared memory one block may use on this CUDA device, in bytes (Triton's own figure)."""
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(device_index)["max_shared_mem"])


def check_budget(q: torch.Tensor, block_q: int, block_k: int, backward: bool) -> None:
    """Refuses, before any kernel runs, sizes whose kernels fit no plan on this device."""
    if q.device.type == "cuda":
        kernels = KERNELS if backward else ("fwd",)
        check_fits(kernels, block_q, block_k, q.shape[-1], q.dtype,
                   smem_limit(q.device.index or 0))


def _with_plan(kernel: str, q: torch.Tensor, block_q: int, block_k: int,
               launch: Callable[[Plan], None]) -> None:
    """Runs launch(plan) with the first plan that compiles within shared memory: the tuned or
    default plan, fitted down by its estimate; a launch Triton refuses (OutOfResources, raised
    before the kernel runs) moves to the next plan. The CPU interpreter takes the wanted plan."""
    d = q.shape[-1]
    if q.device.type != "cuda":
        launch(wanted_plan(kernel, block_q, block_k, d))
        return
    from triton.runtime.errors import OutOfResources

    size = (kernel, block_q, block_k, d, q.dtype, q.device.index)
    plans = [_CHOSEN[size]] if size in _CHOSEN else fitting_plans(
        kernel, block_q, block_k, d, q.dtype, smem_limit(q.device.index or 0))
    plan = first_launching(plans, launch, OutOfResources)
    if plan is not None:
        _CHOSEN[size] = plan
        return
    check_fits((kernel,), block_q, block_k, d, q.dtype, 0)  # raises the capability error


def first_launching(plans: list[Plan], launch: Callable[[Plan], None],
                    refused: type[Exception]) -> Plan | None:
    """The first plan whose launch does not raise `refused` (launched), or None."""
    for plan in plans:
        try:
            launch(plan)
        except refused:
            continue
        return plan
    return None


def _consts(q: torch.Tensor, block_q: int, block_k: int, has_valid: bool) -> dict:
    d = q.shape[-1]
    return {"HEAD_DIM": d, "BLOCK_D": max(16, next_power_of_2(d)), "BLOCK_Q": block_q,
            "BLOCK_K": block_k, "HAS_VALID": has_valid,
            "PREC": "ieee" if q.dtype == torch.float32 else "tf32"}


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether a row offset within one (batch, head) can pass int32."""
    return any(t.shape[1] * t.stride(1) >= 2**31 for t in tensors)


def _forward(q, k, v, index, count, valid, row_mask, block_q, block_k, scale):
    b, n, h, _ = q.shape
    out = _alloc(tuple(q.shape), q.dtype, q.device)
    lse = _alloc((b, h, n), torch.float32, q.device)
    if gluon_path.forward(q, k, v, index, count, valid, row_mask, block_q, block_k, scale, out,
                          lse):
        return out, lse
    # Without a mask the kernel never reads RMASK: any tensor and strides stand in for it.
    rmask = row_mask if row_mask is not None else index

    def launch(plan: Plan) -> None:
        _fwd_kernel[(cdiv(n, block_q) * plan.split, b * h)](
            q, k, v, out, lse, index, count, valid if valid is not None else count, rmask,
            q.stride(), k.stride(), v.stride(), out.stride(), index.stride(), count.stride(),
            rmask.stride(), n, k.shape[1], h, h // k.shape[2], scale * LOG2E,
            INT64=_needs_int64(q, k, v, out), **_consts(q, block_q, block_k, valid is not None),
            STEP=plan.step, TILE_Q=block_q // plan.split, HAS_ROW_MASK=row_mask is not None,
            **plan.launch_kwargs())

    _with_plan("fwd", q, block_q, block_k, launch)
    return out, lse


def transpose_lists(index: torch.Tensor, count: torch.Tensor, num_key_blocks: int,
                    dense: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block, the query blocks that visit it: (k2q int32 [B, H, NKB, NQB], k2q_count
    int32 [B, H, NKB]), entries in increasing order, built on the device without a host sync.
    With dense (dense_row_mask), a pair whose row bits are all 0 is left out: no row of it
    attends the block."""
    b, h, nqb, _ = index.shape
    if dense is None:
        mask = index_to_block_mask(index, count, num_key_blocks).view(torch.int8)
    else:
        mask = (dense != 0).view(torch.int8)
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
    q, k, v, out, lse, index, count, valid, row_mask = ctx.saved_tensors
    block_q, block_k = ctx.block_q, ctx.block_k
    n, m = q.shape[1], k.shape[1]
    nqb = cdiv(n, block_q)
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    delta, lse2 = _row_terms(out, dout, lse, dlse, nqb * block_q)
    dk = _alloc(tuple(k.shape), k.dtype, k.device)
    dv = _alloc(tuple(v.shape), v.dtype, v.device)
    if gluon_path.backward_usable(q, k, v, dout, row_mask, block_q, block_k,
                                  ctx.deterministic, ctx.gluon_backward):
        k2q, k2q_count = transpose_lists(index, count, cdiv(m, block_k))
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        if gluon_path.backward(q, k, v, dout, lse2, delta, k2q, k2q_count, valid, block_q,
                               block_k, ctx.scale, dq_acc, dk, dv):
            dq = _alloc(tuple(q.shape), q.dtype, q.device)
            return dq.copy_(dq_acc), dk, dv
    dq = _alloc(tuple(q.shape), q.dtype, q.device)
    common = (q, k, v, dout, lse2, delta, valid if valid is not None else count,
              valid is not None, ctx.scale, block_q, block_k)
    _with_plan("dq", q, block_q, block_k,
               lambda plan: launch_dq(*common, dq, index, count, plan, row_mask))
    dense = None if row_mask is None else dense_row_mask(index, count, row_mask,
                                                         cdiv(m, block_k))
    k2q, k2q_count = transpose_lists(index, count, cdiv(m, block_k), dense)
    _with_plan("dkdv", q, block_q, block_k,
               lambda plan: launch_dkdv(*common, dk, dv, k2q, k2q_count, plan, dense))
    return dq, dk, dv


def launch_dq(q, k, v, dout, lse2, delta, valid, has_valid, scale, block_q, block_k, dq, index,
              count, plan: Plan, row_mask: torch.Tensor | None = None) -> None:
    """dQ over each query block's list; valid is key_block_valid, or any int32 tensor when
    has_valid is False; row_mask as block_sparse_attention's, or None."""
    b, n, h, _ = q.shape
    rmask = row_mask if row_mask is not None else index
    _dq_kernel[(cdiv(n, block_q) * plan.split, b * h)](
        q, k, v, dout, dq, lse2, delta, index, count, valid, rmask, q.stride(), k.stride(),
        v.stride(), dout.stride(), dq.stride(), index.stride(), count.stride(), rmask.stride(),
        n, k.shape[1], lse2.shape[-1], h, h // k.shape[2], scale * LOG2E, scale,
        INT64=_needs_int64(q, k, v, dout, dq), **_consts(q, block_q, block_k, has_valid),
        STEP=plan.step, TILE_Q=block_q // plan.split, HAS_ROW_MASK=row_mask is not None,
        **plan.launch_kwargs())


def launch_dkdv(q, k, v, dout, lse2, delta, valid, has_valid, scale, block_q, block_k, dk, dv,
                k2q, k2q_count, plan: Plan, dense: torch.Tensor | None = None) -> None:
    """dK/dV over each key block's transposed list (transpose_lists); dense the row bits per
    (query block, key block) pair (dense_row_mask), or None."""
    b, n, h, _ = q.shape
    m, hkv = k.shape[1], k.shape[2]
    nkb = cdiv(m, block_k)
    words = dense if dense is not None else k2q
    _dkdv_kernel[(nkb * plan.split, b * hkv)](
        q, k, v, dout, dk, dv, lse2, delta, k2q, k2q_count, valid, words, q.stride(),
        k.stride(), v.stride(), dout.stride(), dk.stride(), dv.stride(), words.stride(), n, m,
        lse2.shape[-1], h, hkv, h // hkv, k2q.shape[-1], nkb, scale * LOG2E, scale,
        INT64=_needs_int64(q, k, v, dout, dk, dv), **_consts(q, block_q, block_k, has_valid),
        STEP=plan.step, TILE_K=block_k // plan.split, ROWS=block_q // plan.rows_split,
        HAS_ROW_MASK=dense is not None,
        **plan.launch_kwargs())


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index, count, valid, row_mask, block_q, block_k, scale,
                deterministic):
        out, lse = _forward(q, k, v, index, count, valid, row_mask, block_q, block_k, scale)
        ctx.save_for_backward(q, k, v, out, lse, index, count, valid, row_mask)
        ctx.block_q, ctx.block_k, ctx.scale = block_q, block_k, scale
        ctx.deterministic = deterministic
        # The switch as it stands now: the backward may run on autograd's device thread.
        ctx.gluon_backward = gluon_backward_on(block_q, block_k)
        ctx.set_materialize_grads(False)  # an unused lse sends None, not a zero tensor
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv = _backward(ctx, dout, dlse)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def run(q, k, v, index, count, valid, block_q, block_k, softmax_scale, row_mask=None,
        deterministic=False):
    """Checked inputs -> (out, lse) through the autograd Function. deterministic: the
    backward keeps the Triton kernels (the Gluon one sums dQ in a varying order)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    check_budget(q, block_q, block_k, backward)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = (t.contiguous() for t in (q, k, v))
    return _BlockSparseAttention.apply(q, k, v, index, count, valid, row_mask, block_q, block_k,
                                       scale, deterministic)
