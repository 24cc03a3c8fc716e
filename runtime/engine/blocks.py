"""Masks turned into block lists: which tiles of the score matrix are fully kept, partly kept
or empty, and per row of tiles the lists of key tiles to visit (transposed for dK/dV).

Shapes: classes int8 [Bm, Hm, NQB, NKB] (Bm is B or 1 and Hm is H or 1, as the mask depends
on b and h or not): EMPTY, PARTIAL or FULL. A tile that overhangs the sequence ends is PARTIAL,
so FULL tiles need no bounds checks. Lists: idx int32 [Bm, Hm, R, K], cnt int32 [Bm, Hm, R].
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from attnrt.engine.call import Call
from attnrt.engine.evaluate import TorchEval
from attnrt.engine.reference import RefFns, _index_leaves, _keep

EMPTY, PARTIAL, FULL = 0, 1, 2
_CACHE: OrderedDict[tuple, tuple] = OrderedDict()
_CACHE_SIZE = 64
_CHUNK_ELEMENTS = 1 << 26


def _dense_classes(n: int, m: int, bm: int, bn: int, device: torch.device) -> torch.Tensor:
    classes = torch.full((1, 1, -(-n // bm), -(-m // bn)), FULL, dtype=torch.int8, device=device)
    if n % bm:
        classes[:, :, -1] = PARTIAL
    if m % bn:
        classes[..., -1] = PARTIAL
    return classes


def block_classes(fns: RefFns, call: Call, bm: int, bn: int) -> torch.Tensor:
    """EMPTY / PARTIAL / FULL per tile of bm rows by bn keys, from the call's whole mask."""
    b, n, h, _ = call.q.shape
    m = call.k.shape[1]
    if fns.mask is None and call.varlen is None and call.block_mask is None:
        return _dense_classes(n, m, bm, bn, call.q.device)
    nkb = -(-m // bn)
    rows = max(bm, _CHUNK_ELEMENTS // max(1, _mask_planes(fns, call) * m) // bm * bm)
    parts = []
    for start in range(0, n, rows):
        count = min(rows, n - start)
        leaves, same_doc = _index_leaves(call, start, count)
        ev = TorchEval(leaves, call.inputs, torch.float32)
        keep = _keep(fns, ev, same_doc, call, start, count)
        keep = torch.as_tensor(keep, device=call.q.device)
        keep = keep.expand(*keep.shape[:2], count, m) if keep.dim() == 4 else \
            torch.broadcast_to(keep, (1, 1, count, m))
        pad = torch.zeros(*keep.shape[:2], -(-count // bm) * bm, nkb * bn, dtype=torch.bool,
                          device=keep.device)
        pad[:, :, :count, :m] = keep
        tiles = pad.view(*pad.shape[:2], -1, bm, nkb, bn)
        any_ = tiles.any(5).any(3)
        all_ = tiles.all(5).all(3)
        parts.append(torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8))
    shapes = {p.shape[:2] for p in parts}
    bb, hh = max(s[0] for s in shapes), max(s[1] for s in shapes)
    return torch.cat([p.expand(bb, hh, -1, -1) for p in parts], 2)


def _mask_planes(fns: RefFns, call: Call) -> int:
    """How many (b, h) planes the mask grid has: 1 where it reads neither b nor h."""
    b, _, h, _ = call.q.shape
    if call.block_mask is not None or fns.mask_leaves is None or any(
            name.startswith("in.") for name in fns.mask_leaves):
        return b * h
    reads_b = "b" in fns.mask_leaves and call.varlen is None  # varlen b is per row
    return (b if reads_b else 1) * (h if "h" in fns.mask_leaves else 1)


def block_lists(classes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(full idx, full cnt, partial idx, partial cnt): idx int32 [Bm, Hm, R, K] lists the FULL
    (PARTIAL) tiles of each row of tiles in increasing order, cnt int32 [Bm, Hm, R] how many;
    both idx share one K >= 1, so one offset addresses either."""
    out = []
    for which in (FULL, PARTIAL):
        chosen = classes == which
        order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)
        out.append((order, chosen.sum(-1, dtype=torch.int32)))
    width = max(1, max(int(cnt.max()) if cnt.numel() else 1 for _, cnt in out))
    return tuple(t for order, cnt in out
                 for t in (order[..., :width].to(torch.int32).contiguous(), cnt.contiguous()))


def static_key(call: Call, variant_key: str, mask_static: bool, tiles: tuple) -> Any:
    """A cache key when the block classes depend on shapes alone, else None."""
    if not mask_static or call.varlen is not None or call.block_mask is not None:
        return None
    b, n, h, _ = call.q.shape
    return variant_key, b, h, n, call.k.shape[1], tiles, str(call.q.device)


def cached_lists(key: Any, make: Any) -> Any:
    """make() once per key (an LRU of _CACHE_SIZE entries); key None: no caching."""
    if key is None:
        return make()
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = make()
    _CACHE[key] = value
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def clear_cache() -> None:
    _CACHE.clear()
