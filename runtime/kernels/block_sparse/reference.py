"""Pure-PyTorch meaning of the block-sparse attention kernel: dense attention under the token
mask that the block lists describe. Slow (it materialises [B, H, N, M] scores); for tests and
for reading. Differentiable, since it is plain torch.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size,
NQB = ceil(N / block_q), NKB = ceil(M / block_k), MAXK the length of each block list.
"""

from __future__ import annotations

import math

import torch

from .checks import check_inputs


def block_mask_to_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, H, NQB, NKB] -> (block_index int32 [B, H, NQB, NKB], block_count int32
    [B, H, NQB]).

    Row i of block_index lists the key blocks mask[b, h, i] keeps, in increasing order, then
    the others (ignored, since block_count[b, h, i] counts only the kept ones). Runs on the
    mask's device without a host synchronisation.
    """
    keep = mask.to(torch.int8)
    # A stable descending sort of 0/1 puts the kept ids first, each group in increasing order.
    index = torch.sort(keep, dim=-1, descending=True, stable=True).indices
    return index.to(torch.int32), keep.sum(dim=-1, dtype=torch.int32)


def _by_key_block(block_index: torch.Tensor, block_count: torch.Tensor, values: torch.Tensor,
                  num_key_blocks: int) -> torch.Tensor:
    """values [B, H, NQB, MAXK] (or broadcastable), aligned with block_index -> [B, H, NQB,
    NKB] of values' dtype: each listed entry's value at its key block id, zero elsewhere. One
    scatter on the device (entries past each count land in a dropped column)."""
    maxk = block_index.shape[-1]
    used = torch.arange(maxk, device=block_index.device) < block_count[..., None]
    ids = block_index.long().masked_fill(~used, num_key_blocks)
    out = torch.zeros((*ids.shape[:3], num_key_blocks + 1), dtype=values.dtype,
                      device=ids.device)
    out.scatter_(-1, ids, values.to(ids.device).expand(ids.shape))
    return out[..., :num_key_blocks]


def index_to_block_mask(block_index: torch.Tensor, block_count: torch.Tensor,
                        num_key_blocks: int) -> torch.Tensor:
    """(block_index [B, H, NQB, MAXK], block_count [B, H, NQB]) -> bool [B, H, NQB, NKB]: the
    inverse of block_mask_to_index (entries past each count ignored)."""
    listed = torch.ones((), dtype=torch.bool, device=block_index.device)
    return _by_key_block(block_index, block_count, listed, num_key_blocks)


def dense_row_mask(block_index: torch.Tensor, block_count: torch.Tensor, row_mask: torch.Tensor,
                   num_key_blocks: int) -> torch.Tensor:
    """row_mask int64 [B, H, NQB, MAXK] (aligned with block_index) -> int64 [B, H, NQB, NKB]:
    the row bits of each (query block, key block) pair, 0 where the block is not listed."""
    return _by_key_block(block_index, block_count, row_mask, num_key_blocks)


def key_valid_tokens(m: int, block_k: int, key_block_valid: torch.Tensor | None,
                     device: torch.device) -> torch.Tensor:
    """bool [M]: whether key token j counts (it lies within the first key_block_valid[j //
    block_k] tokens of its block; every existing token when key_block_valid is None)."""
    pos = torch.arange(m, device=device)
    if key_block_valid is None:
        return torch.ones(m, dtype=torch.bool, device=device)
    return (pos % block_k) < key_block_valid.to(device).long()[pos // block_k]


def row_mask_bits(n: int, block_index: torch.Tensor, block_count: torch.Tensor,
                  row_mask: torch.Tensor, block_q: int, num_key_blocks: int) -> torch.Tensor:
    """bool [B, H, N, NKB]: bit (i % block_q) of row_mask at the entry that lists key block kb
    for query block i // block_q (False where kb is not listed)."""
    words = dense_row_mask(block_index, block_count, row_mask, num_key_blocks)
    rows = torch.arange(n, device=words.device)
    per_row = words[:, :, rows // block_q]  # [B, H, N, NKB]
    return ((per_row >> (rows % block_q)[:, None]) & 1) != 0


def token_mask(n: int, m: int, block_index: torch.Tensor, block_count: torch.Tensor,
               block_q: int, block_k: int, key_block_valid: torch.Tensor | None,
               row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, H, N, M]: True where query i attends key j."""
    nkb = -(-m // block_k)
    rows = torch.arange(n, device=block_index.device)
    if row_mask is None:
        blocks = index_to_block_mask(block_index, block_count, nkb)[:, :, rows // block_q]
    else:
        blocks = row_mask_bits(n, block_index, block_count, row_mask, block_q, nkb)
    cols = torch.arange(m, device=blocks.device) // block_k
    keep = blocks[:, :, :, cols]
    return keep & key_valid_tokens(m, block_k, key_block_valid, blocks.device)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v restricted to `keep` [B, H, N, M] (broadcastable), accumulated in
    float64 for float64 inputs, else float32. Returns (out [B, N, H, D] in q's dtype, lse
    [B, H, N]); a row that keeps no key gets out = 0 and lse = -inf."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[2] // k.shape[2]
    kf = k.to(acc).repeat_interleave(group, dim=2)
    vf = v.to(acc).repeat_interleave(group, dim=2)
    scores = torch.einsum("bnhd,bmhd->bhnm", q.to(acc), kf) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    empty = ~keep.any(dim=-1)
    # Empty rows take a finite lse here, so exp(-inf - lse) = 0 and no NaN reaches a gradient.
    lse_all = torch.logsumexp(scores.masked_fill(empty[..., None], 0.0), dim=-1)
    probs = torch.exp(scores - lse_all[..., None])
    out = torch.einsum("bhnm,bmhd->bnhd", probs, vf).to(q.dtype)
    return out, lse_all.masked_fill(empty, float("-inf"))


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    *,
    block_q: int = 64,
    block_k: int = 64,
    key_block_valid: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention over q [B, N, H, D] and k, v [B, M, Hkv, D] (H % Hkv == 0), in
    pure torch; the documented meaning of `block_sparse_attention`.

    Query i (block i // block_q) attends key j (block j // block_k) iff that key block is among
    the first block_count[b, h, i // block_q] entries of block_index[b, h, i // block_q] and j
    is among the first key_block_valid[j // block_k] tokens of its block (None: every token
    that exists) and, with row_mask int64 [B, H, NQB, MAXK] (block_q <= 64), bit
    i % block_q of the word at that key block's entry is set. Query head h reads key/value
    head h // (H // Hkv).

    Equivalent PyTorch: softmax(q k^T * scale masked to -inf outside the kept pairs) v, with a
    row that keeps no key giving out = 0 and lse = -inf. Returns out [B, N, H, D] in q's dtype
    and, with return_lse, lse [B, H, N] (natural log; float64 for float64 inputs, else float32).
    `deterministic` is accepted for signature parity (this is always deterministic).
    """
    index, count, valid, mask = check_inputs(
        q, k, v, block_index, block_count, block_q, block_k, key_block_valid, softmax_scale,
        {"return_lse": return_lse, "deterministic": deterministic}, kernel=False,
        row_mask=row_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    keep = token_mask(q.shape[1], k.shape[1], index, count, block_q, block_k, valid, mask)
    out, lse = masked_attention(q, k, v, keep, scale)
    return (out, lse) if return_lse else out
