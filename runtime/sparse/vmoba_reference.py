"""The published VMoBA algorithm in plain float64 PyTorch and Python loops: the documented
meaning of `attnrt.sparse.vmoba.VMOBAAttentionImpl`, written without its helpers (no chunk
reordering: chunk ids come from grid coordinates; no packing; dense masked attention).
Slow; for tests at tiny sizes.

Shapes: B batch, N = T * Hp * Wp tokens in grid order, H query heads, Hkv key/value heads,
D head size, C chunks per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def chunk_of_tokens(grid: Sequence[int], chunk: int | Sequence[int]) -> torch.Tensor:
    """int64 [N]: the chunk of each token (grid order), numbered as the chunk order lays them."""
    t, hp, wp = grid
    tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(hp), torch.arange(wp),
                                indexing="ij")
    tt, yy, xx = tt.reshape(-1), yy.reshape(-1), xx.reshape(-1)
    if isinstance(chunk, int):
        return tt // chunk
    ct, ch, cw = (t, *chunk) if len(chunk) == 2 else tuple(chunk)
    nh, nw = hp // ch, wp // cw
    return ((tt // ct) * nh + yy // ch) * nw + xx // cw


def _threshold_group(entries: list[tuple[float, bool, tuple[int, ...]]],
                     threshold: float) -> set[tuple[int, ...]]:
    """entries (gate, own, key) of one group -> the keys kept (own ones always)."""
    gates = [g for g, _, _ in entries]
    low, high = min(gates), max(gates)
    span = high - low if high - low > 1e-6 else 1.0
    norm = [((g - low) / span, own, key) for g, own, key in entries]
    total = sum(x for x, _, _ in norm)
    remain = max(threshold - sum(x for x, own, _ in norm if own) / (total + 1e-6), 0.0)
    kept = {key for _, own, key in norm if own}
    others = sorted(((x, key) for x, own, key in norm if not own), key=lambda e: -e[0])
    running = 0.0
    for x, key in others:  # the best other always, then until the share reaches `remain`
        kept.add(key)
        running += x
        if running / (total + 1e-6) >= remain:
            break
    return kept


def _topk_group(entries: list[tuple[float, bool, tuple[int, ...]]],
                count: int) -> set[tuple[int, ...]]:
    ranked = sorted(entries, key=lambda e: (not e[1], -e[0]))  # own first, then by gate
    return {key for _, _, key in ranked[:count]}


def _group_key(kind: str, b: int, c: int, h: int, t: int) -> tuple[int, ...]:
    return {"query_head": (b, h, t), "block": (b, c), "head_global": (h,),
            "overall": ()}[kind]


def select_reference(q: torch.Tensor, k: torch.Tensor, grid: Sequence[int],
                     chunk: int | Sequence[int], select_mode: str, threshold_type: str,
                     threshold: float, topk: int) -> torch.Tensor:
    """bool [B, C, H, N] (N in grid order): chunk c kept for (query t, head h)."""
    q, k = q.detach().double(), k.detach().double()  # selection is discrete: no gradient
    b, n, h, _ = q.shape
    group_size = h // k.shape[2]
    owner = chunk_of_tokens(grid, chunk)
    c = int(owner.max()) + 1
    means = torch.stack([k[:, owner == i].mean(1) for i in range(c)], 1)  # [B, C, Hkv, D]
    groups: dict[tuple[int, ...], list[tuple[float, bool, tuple[int, ...]]]] = {}
    for bi in range(b):
        for ci in range(c):
            for hi in range(h):
                for ti in range(n):
                    gate = float(q[bi, ti, hi] @ means[bi, ci, hi // group_size])
                    # block groups never mix samples; the others span the whole batch
                    key = _group_key(threshold_type, bi, ci, hi, ti)
                    groups.setdefault(key, []).append((gate, int(owner[ti]) == ci,
                                                       (bi, ci, hi, ti)))
    kept: set[tuple[int, ...]] = set()
    per_group = {"query_head": topk, "head_global": topk * b * n, "overall": topk * h * b * n}
    for entries in groups.values():
        kept |= (_topk_group(entries, per_group[threshold_type]) if select_mode == "topk"
                 else _threshold_group(entries, threshold))
    out = torch.zeros(b, c, h, n, dtype=torch.bool)
    for key in kept:
        out[key] = True
    return out


def vmoba_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Sequence[int],
                    chunk: int | Sequence[int], select_mode: str = "threshold",
                    threshold_type: str = "query_head", threshold: float = 0.25,
                    topk: int = 3, scale: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, N, H, D], k/v [B, N, Hkv, D] in grid order -> (out [B, N, H, D] float64,
    selection bool [B, C, H, N]): each query attends the keys of its selected chunks."""
    select = select_reference(q, k, grid, chunk, select_mode, threshold_type, threshold, topk)
    q, k, v = q.double(), k.double(), v.double()
    b, n, h, d = q.shape
    group_size = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    owner = chunk_of_tokens(grid, chunk)
    out = torch.zeros(b, n, h, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            keep = select[bi, :, hi].T[:, owner]  # [N queries, N keys]
            s = q[bi, :, hi] @ k[bi, :, hi // group_size].T * scale
            p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
            out[bi, :, hi] = p @ v[bi, :, hi // group_size]
    return out, select
