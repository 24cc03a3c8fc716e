"""Checking one call's tensors against a variant, before any kernel runs.

Shapes: B batch, N queries, M keys, H heads, Hkv kv heads, D head size, Dv value head size.
q [B, N, H, D], k [B, M, Hkv, D], v [B, M, Hkv, Dv]. Variable-length batches pack S sequences
into B = 1 (q [1, total_N, H, D] or [total_N, H, D]) with cu_len_q, cu_len_kv int [S + 1]; then
`b` in the user's functions is the sequence and q_idx / kv_idx positions within it, and no key
of one sequence is seen by a query of another. block_sparse_mask bool [B, H, NQB, NKB] (or
block_sparse_indices int [B, H, NQB, K] with block_num int [B, H, NQB]) keeps only the listed
blocks of `block_size` (rows, keys) tokens, on top of mask_mod.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnrt.engine.errors import EngineInputError
from attnrt.engine.evaluate import bounds
from attnrt.engine.spec import Variant
from attnrt.engine.trace import Expr


@dataclass
class Call:
    """A checked call: 4D q, k, v, the custom inputs by name, and the optional layout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    inputs: dict[str, torch.Tensor]
    varlen: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None  # doc/pos q, k
    num_seqs: int
    block_mask: torch.Tensor | None
    block_size: tuple[int, int]
    squeeze: bool

    @property
    def sizes(self) -> dict[str, int]:
        """Sizes the index leaves range over (as seen by the user's functions)."""
        b, n, h, _ = self.q.shape
        if self.varlen is None:
            return {"b": b, "h": h, "q_idx": n, "kv_idx": self.k.shape[1]}
        doc_q, pos_q, doc_k, pos_k = self.varlen
        longest_q = int(pos_q.max()) + 1 if pos_q.numel() else 1
        longest_k = int(pos_k.max()) + 1 if pos_k.numel() else 1
        return {"b": self.num_seqs, "h": h, "q_idx": longest_q, "kv_idx": longest_k}


def _check_qkv(q: Any, k: Any, v: Any) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise EngineInputError(f"{name} must be a floating tensor [B, N, H, D]; got "
                                   f"{getattr(t, 'shape', type(t).__name__)}")
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or v.shape[:3] != k.shape[:3] or h % k.shape[2]:
        raise EngineInputError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q "
                               f"{tuple(q.shape)}; allowed: k [B, M, Hkv, D], v [B, M, Hkv, Dv]"
                               " with H % Hkv == 0")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise EngineInputError(f"q, k, v must share dtype and device; got {q.dtype}/{q.device}, "
                               f"{k.dtype}/{k.device}, {v.dtype}/{v.device}")


def _bind_inputs(variant: Variant, custom: Any, q: torch.Tensor) -> dict[str, torch.Tensor]:
    names = variant.input_names
    if custom is None:
        custom = []
    if isinstance(custom, dict):
        missing = set(names) ^ set(custom)
        if missing:
            raise EngineInputError(f"custom_inputs names {sorted(custom)}; declared: "
                                   f"{list(names)}")
        custom = [custom[n] for n in names]
    if not isinstance(custom, list | tuple) or len(custom) != len(names):
        got = len(custom) if isinstance(custom, list | tuple) else type(custom).__name__
        raise EngineInputError(f"custom_inputs has {got} tensors; custom_fwd_inputs declares "
                               f"{len(names)}: {', '.join(names) or 'none'}")
    allowed = {q.dtype, torch.float32, torch.int32, torch.int64}
    for name, t in zip(names, custom, strict=True):
        if not isinstance(t, torch.Tensor):
            raise EngineInputError(f"custom input {name!r} is {type(t).__name__}, not a tensor")
        if t.device != q.device:
            raise EngineInputError(f"custom input {name!r} is on {t.device}; q is on "
                                   f"{q.device}: custom inputs must be on q's device")
        if t.dtype not in allowed:
            raise EngineInputError(f"custom input {name!r} has dtype {t.dtype}; allowed: "
                                   f"{', '.join(sorted(str(d) for d in allowed))}")
    return dict(zip(names, custom, strict=True))


def _check_shapes(variant: Variant, inputs: dict[str, torch.Tensor],
                  sizes: dict[str, int]) -> None:
    named = {"batch": sizes["b"], "heads": sizes["h"], "seq_len": sizes["q_idx"],
             "seq_len_kv": sizes["kv_idx"]}
    for name, spec in variant.inputs:
        want = tuple(named.get(d, d) for d in spec)
        got = tuple(inputs[name].shape)
        if len(got) != len(want) or any(w != g for w, g in zip(want, got, strict=True)
                                        if not (isinstance(w, int) and w == 1 and g == 1)):
            raise EngineInputError(f"custom input {name!r} has shape {got}; declared {spec} "
                                   f"= {want} here")


def input_reads(variant: Variant) -> list[tuple[str, Expr]]:
    """Every custom-input read (name, node) of the variant's score_mod and mask_mod."""
    found: dict[str, tuple[str, Expr]] = {}
    stack = [variant.score] + ([variant.mask] if variant.mask is not None else [])
    while stack:
        node = stack.pop()
        if node.op == "input":
            found.setdefault(node.text, (node.attr, node))
        stack.extend(node.args)
    return list(found.values())


def check_index_ranges(variant: Variant, inputs: dict[str, torch.Tensor],
                       sizes: dict[str, int]) -> None:
    """Raise if any custom-input index may fall outside its tensor (interval bounds)."""
    ranges = {name: (0.0, float(n - 1)) for name, n in sizes.items()}
    for name, node in input_reads(variant):
        shape = inputs[name].shape
        for dim, index in enumerate(node.args):
            low, high = bounds(index, ranges)
            if low < 0 or high > shape[dim] - 1:
                raise EngineInputError(
                    f"score_mod/mask_mod reads custom input {name!r} at dim {dim} with index "
                    f"{index.text}, which ranges over [{low:g}, {high:g}] here; the tensor has "
                    f"size {shape[dim]} there (B, H, N, M = {tuple(sizes.values())})")


def _varlen(cu_q: Any, cu_k: Any, q: torch.Tensor, k: torch.Tensor) -> tuple:
    if (cu_q is None) != (cu_k is None):
        raise EngineInputError("cu_len_q and cu_len_kv must be given together")
    if q.shape[0] != 1:
        raise EngineInputError(f"variable-length calls pack sequences into B = 1; q has "
                               f"B = {q.shape[0]}")
    maps = []
    for name, cu, total in (("cu_len_q", cu_q, q.shape[1]), ("cu_len_kv", cu_k, k.shape[1])):
        ok = (isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.numel() >= 2
              and not cu.is_floating_point())
        if not ok:
            raise EngineInputError(f"{name} must be an integer tensor [S + 1]")
        cu = cu.to(q.device, torch.int64)
        if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
            raise EngineInputError(f"{name}={cu.tolist()} must rise from 0 to {total}")
        tokens = torch.arange(total, device=q.device)
        doc = torch.searchsorted(cu, tokens, right=True) - 1
        maps += [doc.to(torch.int32), (tokens - cu[doc]).to(torch.int32)]
    if cu_q.numel() != cu_k.numel():
        raise EngineInputError(f"cu_len_q has {cu_q.numel()} entries, cu_len_kv "
                               f"{cu_k.numel()}; they must describe the same sequences")
    return tuple(maps), cu_q.numel() - 1


def _block_mask(mask: Any, indices: Any, num: Any, q: torch.Tensor, m: int,
                block_size: tuple[int, int]) -> torch.Tensor | None:
    b, n, h, _ = q.shape
    shape = (b, h, -(-n // block_size[0]), -(-m // block_size[1]))
    if mask is not None and indices is not None:
        raise EngineInputError("pass block_sparse_mask or block_sparse_indices, not both")
    if indices is not None:
        if not isinstance(num, torch.Tensor) or not isinstance(indices, torch.Tensor):
            raise EngineInputError("block_sparse_indices needs block_num (int [B, H, NQB])")
        if tuple(indices.shape[:3]) != shape[:3] or tuple(num.shape) != shape[:3]:
            raise EngineInputError(f"block_sparse_indices {tuple(indices.shape)} / block_num "
                                   f"{tuple(num.shape)} must be [{shape[0]}, {shape[1]}, "
                                   f"{shape[2]}, K] / [{shape[0]}, {shape[1]}, {shape[2]}]")
        used = torch.arange(indices.shape[3], device=indices.device) < num[..., None]
        if bool(((indices < 0) | (indices >= shape[3]))[used].any()):
            raise EngineInputError(f"block_sparse_indices holds key blocks outside "
                                   f"[0, {shape[3]})")
        hits = torch.zeros(shape, dtype=torch.int32, device=indices.device)
        hits.scatter_add_(3, torch.where(used, indices, 0).long(), used.to(torch.int32))
        mask = hits > 0
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or \
            tuple(mask.shape) != shape:
        raise EngineInputError(f"block_sparse_mask must be bool {list(shape)} for blocks of "
                               f"{block_size}; got {getattr(mask, 'shape', type(mask).__name__)}")
    return mask.to(q.device)


def check_call(variant: Variant, q: Any, k: Any, v: Any, custom_inputs: Any = None,
               cu_len_q: Any = None, cu_len_kv: Any = None, block_sparse_mask: Any = None,
               block_sparse_indices: Any = None, block_num: Any = None,
               block_size: tuple[int, int] = (64, 64)) -> Call:
    """A checked Call, or EngineInputError naming the argument and what is allowed."""
    squeeze = isinstance(q, torch.Tensor) and q.dim() == 3 and cu_len_q is not None
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    _check_qkv(q, k, v)
    inputs = _bind_inputs(variant, custom_inputs, q)
    varlen, num_seqs = (None, q.shape[0]) if cu_len_q is None and cu_len_kv is None else \
        _varlen(cu_len_q, cu_len_kv, q, k)
    mask = _block_mask(block_sparse_mask, block_sparse_indices, block_num, q, k.shape[1],
                       block_size)
    call = Call(q, k, v, inputs, varlen, num_seqs, mask, block_size, squeeze)
    sizes = call.sizes
    _check_shapes(variant, inputs, sizes)
    check_index_ranges(variant, inputs, sizes)
    return call
