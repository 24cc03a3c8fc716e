"""Input checks of the block-sparse kernel family: every refusal is a typed error naming the
argument, its value and what is allowed, raised before any kernel runs.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size,
NQB = ceil(N / block_q) query blocks, NKB = ceil(M / block_k) key blocks, MAXK list length.
"""

from __future__ import annotations

import math
import os

import torch

from ...errors import AttnrtError

NAME = "block_sparse_attention"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = (*KERNEL_DTYPES, torch.float64)
KERNEL_BLOCK_SIZES = (16, 32, 64, 128)
# Head sizes the Triton kernel serves: multiples of 8 from 16 to 256 (the tile is padded to the
# next power of two and masked).
KERNEL_HEAD_SIZES = tuple(range(16, 257, 8))
# Contents of block_index/block_count on a CUDA device are checked only with this set to 1: the
# check reads them back to the host, a synchronisation the fast path must not pay.
CHECK_ENV = "ATTNRT_BLOCK_SPARSE_CHECKS"


class BlockSparseInputError(AttnrtError, ValueError):
    """A block-sparse argument has a shape, value or device the kernel does not accept."""


class BlockSparseTypeError(AttnrtError, TypeError):
    """A block-sparse argument has a type or dtype the kernel does not accept."""


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...],
            layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise BlockSparseTypeError(f"{name}={type(t).__name__} is not supported by {NAME}; "
                                   f"expected a torch.Tensor {layout}")
    if t.dim() != ndim:
        raise BlockSparseInputError(f"{name}.ndim={t.dim()} is not supported by {NAME}; "
                                    f"expected {ndim} ({layout})")
    if t.dtype not in dtypes:
        raise BlockSparseTypeError(f"{name}.dtype={t.dtype} is not supported by {NAME}; "
                                   f"supported: {_dtype_names(dtypes)}")
    return t


def _check_qkv(q: object, k: object, v: object, kernel: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtypes = KERNEL_DTYPES if kernel else REFERENCE_DTYPES
    q = _tensor("q", q, 4, dtypes, "[B, N, H, D]")
    k = _tensor("k", k, 4, dtypes, "[B, M, Hkv, D]")
    v = _tensor("v", v, 4, dtypes, "[B, M, Hkv, D]")
    if 0 in q.shape or 0 in k.shape:
        raise BlockSparseInputError(f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)} are not "
                                    f"supported by {NAME}; every dimension must be at least 1")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise BlockSparseTypeError(f"{name}.dtype={t.dtype} on {t.device} is not supported by "
                                       f"{NAME}; it must equal q's ({q.dtype} on {q.device})")
    if v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise BlockSparseInputError(
            f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)} are not supported by {NAME} with "
            f"q.shape={tuple(q.shape)}; k and v must be equal and match q's batch and head size")
    if q.shape[2] % k.shape[2] != 0:
        raise BlockSparseInputError(f"num_kv_heads={k.shape[2]} is not supported by {NAME} with "
                                    f"num_heads={q.shape[2]}; num_heads must be a multiple of it")
    return q, k, v


def _check_block_size(name: str, value: object, kernel: bool) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if ok and kernel:
        ok = value in KERNEL_BLOCK_SIZES
    if not ok:
        allowed = ", ".join(map(str, KERNEL_BLOCK_SIZES)) if kernel else "an int >= 1"
        raise BlockSparseInputError(f"{name}={value!r} is not supported by {NAME}; "
                                    f"supported: {allowed}")
    return value  # type: ignore[return-value]


def _check_index(q: torch.Tensor, block_index: object, block_count: object, nqb: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    b, _, h, _ = q.shape
    index = _tensor("block_index", block_index, 4, (torch.int32,), "[B, H, NQB, MAXK]")
    count = _tensor("block_count", block_count, 3, (torch.int32,), "[B, H, NQB]")
    if tuple(index.shape[:3]) != (b, h, nqb):
        raise BlockSparseInputError(f"block_index.shape={tuple(index.shape)} is not supported by "
                                    f"{NAME}; expected [B, H, NQB, MAXK] = [{b}, {h}, {nqb}, *]")
    if tuple(count.shape) != (b, h, nqb):
        raise BlockSparseInputError(f"block_count.shape={tuple(count.shape)} is not supported by "
                                    f"{NAME}; expected [B, H, NQB] = [{b}, {h}, {nqb}]")
    for name, t in (("block_index", index), ("block_count", count)):
        if t.device != q.device:
            raise BlockSparseInputError(f"{name}.device={t.device} is not supported by {NAME}; "
                                        f"it must equal q.device={q.device}")
    return index, count


def _check_valid(q: torch.Tensor, key_block_valid: object, nkb: int) -> torch.Tensor | None:
    if key_block_valid is None:
        return None
    valid = _tensor("key_block_valid", key_block_valid, 1, (torch.int32,), "[NKB]")
    if valid.shape[0] != nkb or valid.device != q.device:
        raise BlockSparseInputError(f"key_block_valid.shape={tuple(valid.shape)} on "
                                    f"{valid.device} is not supported by {NAME}; expected "
                                    f"[NKB] = [{nkb}] on q.device={q.device}")
    return valid.contiguous()  # the kernels read entry j at offset j


# Row masks are one int64 word per list entry: bit r for row r of the query block.
ROW_MASK_MAX_BLOCK_Q = 64


def _check_row_mask(index: torch.Tensor, row_mask: object, block_q: int) -> torch.Tensor | None:
    if row_mask is None:
        return None
    mask = _tensor("row_mask", row_mask, 4, (torch.int64,), "[B, H, NQB, MAXK]")
    if block_q > ROW_MASK_MAX_BLOCK_Q:
        raise BlockSparseInputError(f"row_mask with block_q={block_q} is not supported by "
                                    f"{NAME}; row_mask needs block_q <= {ROW_MASK_MAX_BLOCK_Q} "
                                    "(one int64 bit per query row)")
    if mask.shape != index.shape or mask.device != index.device:
        raise BlockSparseInputError(f"row_mask.shape={tuple(mask.shape)} on {mask.device} is "
                                    f"not supported by {NAME}; expected block_index's shape "
                                    f"{tuple(index.shape)} on {index.device}")
    return mask


def _check_scale(softmax_scale: object) -> None:
    ok = softmax_scale is None or (isinstance(softmax_scale, (int, float))
                                   and not isinstance(softmax_scale, bool)
                                   and math.isfinite(softmax_scale) and softmax_scale > 0)
    if not ok:
        raise BlockSparseInputError(f"softmax_scale={softmax_scale!r} is not supported by {NAME}; "
                                    "expected None or a finite number > 0")


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise BlockSparseTypeError(f"{name}={value!r} is not supported by {NAME}; expected a bool")


def check_contents(block_index: torch.Tensor, block_count: torch.Tensor,
                   key_block_valid: torch.Tensor | None, nkb: int, block_k: int, m: int) -> None:
    """Values of the block lists: counts in [0, MAXK], the used ids in [0, NKB) and distinct per
    query block, valid counts in [0, tokens of the block]. Reads the tensors on the host."""
    maxk = block_index.shape[-1]
    count = block_count.cpu()
    if bool(((count < 0) | (count > maxk)).any()):
        bad = int(count[(count < 0) | (count > maxk)][0])
        raise BlockSparseInputError(f"block_count contains {bad}, which is not supported by "
                                    f"{NAME}; entries must lie in [0, MAXK={maxk}]")
    used = torch.arange(maxk)[None, None, None, :] < count[..., None]
    ids = block_index.cpu().masked_fill(~used, 0)
    if bool(((ids < 0) | (ids >= nkb)).any()):
        bad = int(ids[(ids < 0) | (ids >= nkb)][0])
        raise BlockSparseInputError(f"block_index contains key block {bad}, which is not "
                                    f"supported by {NAME}; used entries must lie in [0, NKB={nkb})")
    hits = torch.zeros((*ids.shape[:3], nkb + 1), dtype=torch.int32)
    hits.scatter_add_(-1, ids.masked_fill(~used, nkb).long(), torch.ones_like(ids))
    if bool((hits[..., :nkb] > 1).any()):
        raise BlockSparseInputError(f"block_index lists a key block twice for one query block, "
                                    f"which is not supported by {NAME}; used entries must be "
                                    "distinct")
    if key_block_valid is not None:
        cap = (m - torch.arange(nkb) * block_k).clamp(max=block_k)
        valid = key_block_valid.cpu()
        if bool(((valid < 0) | (valid > cap)).any()):
            raise BlockSparseInputError(f"key_block_valid={valid.tolist()} is not supported by "
                                        f"{NAME}; entry i must lie in [0, min(block_k, M - i * "
                                        f"block_k)] = [0, {cap.tolist()}]")


def _want_contents(q: torch.Tensor, kernel: bool) -> bool:
    return not kernel or q.device.type == "cpu" or os.environ.get(CHECK_ENV) == "1"


def _check_device(q: torch.Tensor) -> None:
    if q.device.type == "cuda":
        return
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise BlockSparseInputError(f"q.device={q.device} is not supported by the {NAME} kernel; "
                                "supported: cuda, or cpu with TRITON_INTERPRET=1 set before "
                                "triton is imported (block_sparse_attention_reference runs "
                                "anywhere)")


def check_kernel_tensors(q: object, k: object, v: object) -> None:
    """The kernel's limits on q, k, v alone (types, dtypes, shapes, device, head size), for
    callers that run other work before the kernel and must refuse first."""
    q, _, _ = _check_qkv(q, k, v, kernel=True)
    _check_device(q)
    if q.shape[3] not in KERNEL_HEAD_SIZES:
        raise BlockSparseInputError(f"head_size={q.shape[3]} is not supported by the {NAME} "
                                    "kernel; supported: multiples of 8 from 16 to 256")


def check_inputs(q: object, k: object, v: object, block_index: object, block_count: object,
                 block_q: object, block_k: object, key_block_valid: object,
                 softmax_scale: object, flags: dict[str, object], kernel: bool,
                 row_mask: object = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Checks every argument of block_sparse_attention(_reference); kernel=True adds the
    kernel's limits (dtypes, block sizes, head sizes, devices). Returns (block_index,
    block_count, key_block_valid, row_mask) as tensors."""
    if kernel:
        check_kernel_tensors(q, k, v)
    q, k, _ = _check_qkv(q, k, v, kernel)
    bq = _check_block_size("block_q", block_q, kernel)
    bk = _check_block_size("block_k", block_k, kernel)
    nqb, nkb = -(-q.shape[1] // bq), -(-k.shape[1] // bk)
    index, count = _check_index(q, block_index, block_count, nqb)
    valid = _check_valid(q, key_block_valid, nkb)
    mask = _check_row_mask(index, row_mask, bq)
    _check_scale(softmax_scale)
    for name, value in flags.items():
        _check_flag(name, value)
    if _want_contents(q, kernel):
        check_contents(index, count, valid, nkb, bk, k.shape[1])
    return index, count, valid, mask
