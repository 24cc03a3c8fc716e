"""VMoBA attention on the block-sparse kernel: pack (query, chunk) pairs, attend, merge.

Shapes: B batch, N tokens (chunk order), H query heads, Hkv key/value heads, D head size,
C chunks, P packed rows per (batch, head).

Each query picks its own set of chunks, which a block-sparse kernel (one key list per query
block) cannot express directly. So, per (batch, head), every selected (query t, chunk c) pair
becomes one packed query row, rows grouped by chunk and each group padded to whole query
blocks; each packed block visits exactly its chunk's key blocks. The kernel returns each
pair's (out, lse); a query's result is the log-sum-exp merge of its pairs, which equals
attention over the union of its chunks (chunks are disjoint). Padding rows visit nothing.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .pair_scatter import weighted_scatter
from .vmoba_layout import key_blocks, padded_keys


def pack_pairs(select: torch.Tensor, block_q: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """select bool [B, C, H, N] -> (token int64 [B, H, P], real bool [B, H, P], chunk of each
    packed query block int64 [B, H, P // block_q], C for padding-only blocks)."""
    b, c, h, n = select.shape
    sel = select.permute(0, 2, 1, 3)  # [B, H, C, N]
    per_chunk = sel.sum(-1)  # [B, H, C]
    padded = (per_chunk + block_q - 1) // block_q * block_q
    ends = padded.cumsum(-1)
    starts = ends - padded
    rows = int(ends[..., -1].max().item())
    rank = sel.to(torch.int32).cumsum(-1) - 1  # [B, H, C, N]: place within its chunk's group
    bi, hi, ci, ti = sel.nonzero(as_tuple=True)
    pos = starts[bi, hi, ci] + rank[bi, hi, ci, ti]
    token = torch.zeros(b, h, rows, dtype=torch.long, device=select.device)
    real = torch.zeros(b, h, rows, dtype=torch.bool, device=select.device)
    token[bi, hi, pos] = ti
    real[bi, hi, pos] = True
    block_start = torch.arange(0, rows, block_q, device=select.device)
    block_chunk = torch.searchsorted(ends.contiguous(),
                                     block_start.expand(b, h, -1).contiguous(), right=True)
    return token, real, block_chunk


# Memory one call may use for packed rows (packed q, pair outputs, float32 merge terms).
PACKED_BYTES_BUDGET = 8 << 30


def vmoba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, select: torch.Tensor,
                    chunk: int, scale: float, block_q: int = 64, block_k: int = 64,
                    kv_heads_per_call: int | None = None) -> torch.Tensor:
    """q [B, N, H, D], k/v [B, N, Hkv, D] in chunk order, select bool [B, C, H, N] ->
    out [B, N, H, D]: each query's attention over the union of its selected chunks.

    Heads run in groups of `kv_heads_per_call` key/value heads (default: as many as keep the
    packed rows under PACKED_BYTES_BUDGET); with autograd on, each group is checkpointed
    (recomputed in the backward), so the packed rows never pile up across groups.

    Equivalent PyTorch: softmax(q k^T * scale, masked to keys in the selected chunks) v.
    """
    h, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    group = h // hkv
    if kv_heads_per_call is None:
        rows_per_head = max(1, int(select.sum().item()) // h)
        per_kv_head = group * rows_per_head * d * 12  # bf16 q + out, float32 parts + merge
        kv_heads_per_call = max(1, PACKED_BYTES_BUDGET // per_kv_head)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for k0 in range(0, hkv, kv_heads_per_call):
        k1 = min(hkv, k0 + kv_heads_per_call)
        heads = slice(k0 * group, k1 * group)
        args = (q[:, :, heads], k[:, :, k0:k1], v[:, :, k0:k1], select[:, :, heads], chunk,
                scale, block_q, block_k)
        if grad and hkv > kv_heads_per_call:
            outs.append(checkpoint(_attend_heads, *args, use_reentrant=False))
        else:
            outs.append(_attend_heads(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _attend_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, select: torch.Tensor,
                  chunk: int, scale: float, block_q: int, block_k: int) -> torch.Tensor:
    """vmoba_attention for one group of heads, in one kernel call."""
    from attnrt.kernels.block_sparse import block_sparse_attention

    b, n, h, d = q.shape
    token, real, block_chunk = pack_pairs(select, block_q)
    valid, chunk_ids, chunk_counts = key_blocks(n, chunk, block_k, q.device)
    ids = torch.cat([chunk_ids, chunk_ids[:1]])  # row C: padding blocks (count 0)
    counts = torch.cat([chunk_counts, chunk_counts.new_zeros(1)])
    index = ids[block_chunk].contiguous()  # [B, H, P / block_q, KB]
    count = counts[block_chunk].contiguous()
    qh = q.transpose(1, 2)  # [B, H, N, D]
    packed = torch.gather(qh, 2, token[..., None].expand(-1, -1, -1, d)).transpose(1, 2)
    kp, vp = padded_keys(k, chunk, block_k), padded_keys(v, chunk, block_k)
    # The kernel's lse is differentiable too (its backward takes dlse), which the merge needs.
    out, lse = block_sparse_attention(packed.contiguous(), kp, vp, index, count,
                                      block_q=block_q, block_k=block_k, key_block_valid=valid,
                                      softmax_scale=scale, return_lse=True)
    return merge_pairs(out, lse, token, real, n)


def merge_pairs(out: torch.Tensor, lse: torch.Tensor, token: torch.Tensor, real: torch.Tensor,
                n: int) -> torch.Tensor:
    """Pairs' out [B, P, H, D] and lse [B, H, P] -> per token [B, N, H, D]: the
    log-sum-exp-weighted sum over each token's pairs (differentiable)."""
    b, _, h, _ = out.shape
    acc = torch.promote_types(out.dtype, torch.float32)
    lse = torch.where(real, lse.to(acc), torch.full_like(lse, float("-inf"), dtype=acc))
    top = torch.full((b, h, n), float("-inf"), dtype=acc, device=out.device)
    # The max only steadies exp(); it cancels in the share, so it needs no gradient.
    top = top.scatter_reduce(2, token, lse.detach(), "amax", include_self=True)
    weight = torch.exp(lse - top.gather(2, token))  # [B, H, P]; 0 on padding rows
    total = torch.zeros(b, h, n, dtype=acc, device=out.device).scatter_add(2, token, weight)
    share = weight / total.gather(2, token)
    return weighted_scatter(out, share, token, n).to(out.dtype)
