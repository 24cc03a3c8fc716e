"""VMoBA's chunk selection: which key chunks each (query token, head) attends.

Shapes: B batch, N tokens (in chunk order), H query heads, Hkv key/value heads, D head size,
C key chunks per sample (chunk c holds tokens [c * S, min((c + 1) * S, N))).

The published rule (VMoBA, KwaiVGI/VMoBA; FastVideo's `moba_attn_varlen`): the gate of query t
for chunk c is q_t . mean(k over chunk c), in float32. Samples of a batch are laid end to end,
as upstream's varlen call does; a query's gate for another sample's chunk does not count.

- select_mode "topk": its own chunk plus the best others, `moba_topk` entries in all, per
  (query, head) ("query_head"), per head over every (chunk, query) ("head_global", k * S
  entries) or over everything ("overall", k * H * S entries).
- select_mode "threshold": gates are min-max normalised within a group (one (query, head) for
  "query_head", one chunk for "block", one head for "head_global", everything for "overall");
  the own chunks' share of the group's normalised sum counts first; the other entries are then
  taken in descending order until their cumulative share reaches `moba_threshold` minus that
  (the best other is always taken, as upstream's cutoff rule does, even at the group minimum,
  where upstream's pick depends on how its sort orders ties; if the threshold is never
  reached, every other is taken).
Every query always keeps its own chunk (upstream runs it as a separate self-attention branch).
"""

from __future__ import annotations

import torch

from .method_errors import SparseArgumentError, check_choice

SELECT_MODES = ("threshold", "topk")
THRESHOLD_TYPES = {"threshold": ("query_head", "block", "overall", "head_global"),
                   "topk": ("query_head", "overall", "head_global")}
EPS = 1e-6
METHOD = "VMOBA_ATTN"


def check_selection(select_mode: object, threshold_type: object, threshold: object,
                    topk: object) -> None:
    """Typed errors for the selection settings, before anything runs."""
    check_choice("moba_select_mode", select_mode, SELECT_MODES, METHOD)
    check_choice("moba_threshold_type", threshold_type, THRESHOLD_TYPES[str(select_mode)], METHOD)
    if select_mode == "threshold" and (isinstance(threshold, bool)
                                       or not isinstance(threshold, (int, float))
                                       or not 0.0 <= float(threshold) <= 1.0):
        raise SparseArgumentError(f"moba_threshold={threshold!r} is not supported by {METHOD}; "
                                  "allowed: a number in [0, 1]")
    if select_mode == "topk" and (isinstance(topk, bool) or not isinstance(topk, int)
                                  or topk < 1):
        raise SparseArgumentError(f"moba_topk={topk!r} is not supported by {METHOD}; "
                                  "allowed: an int >= 1")


def chunk_gate(q: torch.Tensor, k: torch.Tensor, chunk: int) -> torch.Tensor:
    """q [B, N, H, D], k [B, N, Hkv, D] -> gate [B, C, H, N] float32 (float64 for float64):
    q_t . mean(k over chunk c)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, n, hkv, d = k.shape
    c = -(-n // chunk)
    sums = torch.zeros(b, c * chunk, hkv, d, dtype=acc, device=k.device)
    sums[:, :n] = k
    counts = (torch.arange(c, device=k.device) * chunk - n).neg().clamp(max=chunk).to(acc)
    means = sums.view(b, c, chunk, hkv, d).sum(2) / counts[:, None, None]
    means = means.repeat_interleave(q.shape[2] // hkv, dim=2)  # [B, C, H, D]
    return torch.einsum("bchd,bnhd->bchn", means, q.to(acc))


def _flat(gate: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, C, H, N] -> upstream's varlen view (gate [B*C, H, B*N], valid, own-chunk masks)."""
    b, c, h, n = gate.shape
    if b == 1:  # no foreign entries: a view, not a copy (the gate can be GBs)
        flat = gate[0]
        valid = torch.ones(c, 1, n, dtype=torch.bool, device=gate.device)
    else:
        flat = gate.new_zeros(b * c, h, b * n)
        valid = torch.zeros(b * c, 1, b * n, dtype=torch.bool, device=gate.device)
        for i in range(b):
            flat[i * c:(i + 1) * c, :, i * n:(i + 1) * n] = gate[i]
            valid[i * c:(i + 1) * c, :, i * n:(i + 1) * n] = True
    token_chunk = torch.arange(b * n, device=gate.device) % n // chunk + \
        torch.arange(b * n, device=gate.device) // n * c
    own = (token_chunk[None, :] == torch.arange(b * c, device=gate.device)[:, None])[:, None]
    return flat, valid.expand(-1, h, -1), own.expand(-1, h, -1)


def _unflat(mask: torch.Tensor, b: int, c: int, n: int) -> torch.Tensor:
    """[B*C, H, B*N] -> [B, C, H, N] (each sample's own block)."""
    return torch.stack([mask[i * c:(i + 1) * c, :, i * n:(i + 1) * n] for i in range(b)])


def _groups(x: torch.Tensor, threshold_type: str) -> torch.Tensor:
    """[C, H, S] -> [G, E]: one row per normalisation group."""
    if threshold_type == "query_head":
        return x.permute(1, 2, 0).reshape(-1, x.shape[0])
    if threshold_type == "block":
        return x.reshape(x.shape[0], -1)
    if threshold_type == "head_global":
        return x.permute(1, 0, 2).reshape(x.shape[1], -1)
    return x.reshape(1, -1)  # overall


def _ungroup(x: torch.Tensor, threshold_type: str, shape: torch.Size) -> torch.Tensor:
    c, h, s = shape
    if threshold_type == "query_head":
        return x.view(h, s, c).permute(2, 0, 1)
    if threshold_type == "head_global":
        return x.view(h, c, s).permute(1, 0, 2)
    return x.view(c, h, s)


def threshold_rows(gate: torch.Tensor, valid: torch.Tensor, own: torch.Tensor,
                   threshold: float) -> torch.Tensor:
    """Per row of gate [G, E]: the entries the threshold rule keeps (bool [G, E])."""
    big = torch.finfo(gate.dtype).max
    low = torch.where(valid, gate, big).amin(1, keepdim=True)
    high = torch.where(valid, gate, -big).amax(1, keepdim=True)
    denom = high - low
    denom = torch.where(denom <= EPS, torch.ones_like(denom), denom)
    norm = torch.where(valid, (gate - low) / denom, torch.zeros_like(gate))
    total = norm.sum(1, keepdim=True)
    remain = (threshold - (norm * own).sum(1, keepdim=True) / (total + EPS)).clamp_min(0.0)
    # Own and foreign entries sort below every valid other (upstream zeroes them, which ties
    # with a valid other at the group minimum and leaves the pick to the sort's whim).
    others = torch.where(own | ~valid, torch.full_like(norm, -1.0), norm)
    ordered, order = torch.sort(others, dim=1, descending=True, stable=True)
    reached = ordered.clamp_min(0.0).cumsum(1) / (total + EPS) >= remain
    first = torch.where(reached.any(1), reached.to(torch.int8).argmax(1),
                        torch.full_like(reached[:, 0], gate.shape[1] - 1, dtype=torch.long))
    take_sorted = torch.arange(gate.shape[1], device=gate.device)[None] <= first[:, None]
    take = torch.zeros_like(valid).scatter(1, order, take_sorted)
    return valid & (take | own)


def topk_select(gate: torch.Tensor, valid: torch.Tensor, own: torch.Tensor, topk: int,
                threshold_type: str) -> torch.Tensor:
    """Upstream's top-k: own chunks lifted by 1e9, then the k (per group) largest gates."""
    c, h, s = gate.shape
    lifted = torch.where(valid, gate + own * 1e9, torch.full_like(gate, float("-inf")))
    rows = _groups(lifted, threshold_type)
    per_row = {"query_head": min(topk, c), "head_global": topk * s, "overall": topk * h * s}
    k = min(per_row[threshold_type], rows.shape[1])
    keep = torch.zeros_like(rows, dtype=torch.bool)
    keep.scatter_(1, torch.topk(rows, k, dim=1, sorted=False).indices, True)
    return valid & _ungroup(keep, threshold_type, gate.shape)


# Gate entries (chunks x heads x tokens) one selection pass may hold; the sort behind the
# threshold rule needs about six times that in bytes per float32 entry.
GATE_ENTRIES_BUDGET = 1 << 29


def select_chunks(q: torch.Tensor, k: torch.Tensor, chunk: int, select_mode: str,
                  threshold_type: str, threshold: float, topk: int) -> torch.Tensor:
    """q [B, N, H, D], k [B, N, Hkv, D] in chunk order, `chunk` tokens per chunk -> bool
    [B, C, H, N]: chunk c is attended by (query t, head h); every query keeps its own chunk.

    Rules whose groups stay within one head (query_head, head_global) run over groups of
    heads that keep the gate under GATE_ENTRIES_BUDGET entries; block and overall groups span
    every head and run at once.
    """
    b, n, h, _ = q.shape
    group = h // k.shape[2]
    per_head = b * b * -(-n // chunk) * n
    step = h
    if threshold_type in ("query_head", "head_global"):
        step = max(group, GATE_ENTRIES_BUDGET // per_head // group * group)
    parts = [_select_heads(q[:, :, h0:h0 + step], k[:, :, h0 // group:(h0 + step) // group],
                           chunk, select_mode, threshold_type, threshold, topk)
             for h0 in range(0, h, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _select_heads(q: torch.Tensor, k: torch.Tensor, chunk: int, select_mode: str,
                  threshold_type: str, threshold: float, topk: int) -> torch.Tensor:
    """select_chunks over the heads of q (k: their key/value heads)."""
    gate = chunk_gate(q, k, chunk)
    b, c, _, n = gate.shape
    flat, valid, own = _flat(gate, chunk)
    if select_mode == "topk":
        keep = topk_select(flat, valid, own, topk, threshold_type)
    else:
        rows = threshold_rows(_groups(flat, threshold_type), _groups(valid, threshold_type),
                              _groups(own, threshold_type), float(threshold))
        keep = _ungroup(rows, threshold_type, flat.shape)
    return _unflat(keep | own, b, c, n)
