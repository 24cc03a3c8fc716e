"""Checks before a ring call: the same shapes on every ring rank, then the inputs themselves.

Shapes: B batch, S block rows, T replicated rows, H heads, Hkv kv heads, D head size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from attnrt.parallel.groups import SequenceParallel, ShardError
from attnrt.parallel.shard_check import check_same_on_all_ranks
from attnrt.parallel.zigzag import check_layout


def group_view(group: Any, meta_group: Any = None) -> SequenceParallel:
    """A SequenceParallel over `group` that only carries shape checks (no exchanges)."""
    backend = str(dist.get_backend(group)).lower()
    return SequenceParallel(group, dist.get_world_size(group), dist.get_rank(group), backend,
                            meta_group if meta_group is not None else group)


def check_ring_inputs(q: Any, k: Any, v: Any, ring: Any, replicated: Any,
                      original_seq_len: Any, gather: bool) -> None:
    """Raise the same ShardError on every ring rank for inputs a ring call cannot take."""
    names = ["q", "k", "v", "replicated_q", "replicated_k", "replicated_v"]
    tensors = [q, k, v, *(replicated if replicated is not None else (None,) * 3)]
    if gather and ring.size > 1:
        check_same_on_all_ranks(group_view(ring.group, ring.meta_group),
                                list(zip(names, tensors, strict=True)), original_seq_len)
    for name, t in zip(names, tensors, strict=True):
        if (t is not None or name[0] != "r") and not (isinstance(t, torch.Tensor)
                                                      and t.dim() == 4):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ShardError(f"{name} has shape {got}; expected 4-D [B, S, H, D]")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ShardError(f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, "
                         f"v.shape={tuple(v.shape)}; allowed: k and v alike, with q's batch, "
                         "block length and head size")
    if q.shape[2] % k.shape[2]:
        raise ShardError(f"q has {q.shape[2]} heads and k {k.shape[2]}; allowed: a multiple")
    if replicated is not None:
        rq, rk, rv = replicated
        if (rq.shape[0] != q.shape[0] or rq.shape[2:] != q.shape[2:] or rk.shape != rv.shape
                or rk.shape[2:] != k.shape[2:] or rk.shape[:2] != rq.shape[:2]):
            raise ShardError(f"replicated shapes {tuple(rq.shape)}, {tuple(rk.shape)}, "
                             f"{tuple(rv.shape)} do not match q {tuple(q.shape)} and k "
                             f"{tuple(k.shape)}")
    full = q.shape[1] * ring.size
    if original_seq_len is not None and (isinstance(original_seq_len, bool) or not isinstance(
            original_seq_len, int) or not 0 < original_seq_len <= full):
        raise ShardError(f"original_seq_len={original_seq_len!r} is not allowed; allowed: None "
                         f"or an int in [1, {full}]")
    check_layout(ring.layout, ring.size, q.shape[1])
