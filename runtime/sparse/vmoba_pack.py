"""VMoBA attention on the block-sparse kernel: per query block, the union of the chunks its rows
selected, with a per-row bit mask.

Shapes: B batch, N tokens (chunk order), H query heads, Hkv key/value heads, D head size,
C chunks, KB key blocks per (padded) chunk, NQB = ceil(N / block_q) query blocks, MAXC the
most chunks one query block lists, MAXK = MAXC * KB.

Each query picks its own set of chunks. Per (batch, head) and query block of block_q rows, the
kernel's key list is every key block of every chunk any of the block's rows selected (in chunk
order), and row_mask bit r of each entry says whether row r selected that entry's chunk: rows
that did not see those keys at -inf. Chunks are disjoint runs of key blocks (each chunk padded
to KB whole blocks, key_block_valid marking the padding), so this is exactly each query's
attention over the union of its chunks: no query is copied, nothing is merged. The cost is
the union: a block's rows may select different chunks, and every row of the block runs over
every chunk any of them selected (masked). On CPU at Wan 480p the union covered 76-100% of the
chunks (bench/NOTES-sla-vmoba.md), so this runs near dense cost unless rows agree.
"""

from __future__ import annotations

from typing import cast

import torch

from .method_errors import SparseArgumentError
from .vmoba_layout import key_blocks, padded_keys
from .vmoba_select import METHOD

# Bytes one pass of the row-bit packing may use: the selection of a group of heads padded to
# whole query blocks (a copy only when N is not a multiple of block_q) and its weighted bytes,
# [B, C, heads, NQB * block_q] each. Heads go in groups of key/value heads that keep a pass
# under it; the lists are then built once for all heads.
PACKED_BYTES_BUDGET = 1 << 30
ROW_MASK_BLOCK_Q = (16, 32, 64)  # one int64 bit per query row; whole bytes of rows


def row_words(select: torch.Tensor, block_q: int) -> torch.Tensor:
    """select bool [B, C, H, N] -> int64 [B, H, NQB, C]: bit r of word [b, h, i, c] is set
    where row r of query block i (token i * block_q + r) selected chunk c. Rows past N are 0.

    Eight rows make a byte (row 8j + s at bit s of byte j); the block's bytes, zero-padded to
    eight, are read as one little-endian int64 (CPU and CUDA byte order), so byte j holds bits
    8j..8j+7 and no shift wider than a byte is needed.
    """
    b, c, h, n = select.shape
    nqb = -(-n // block_q)
    rows = select
    if n != nqb * block_q:
        rows = select.new_zeros(b, c, h, nqb * block_q)
        rows[..., :n] = select
    weights = torch.tensor([1 << s for s in range(8)], dtype=torch.uint8, device=select.device)
    eights = rows.reshape(b, c, h, nqb, block_q // 8, 8).view(torch.uint8)  # no copy
    packed = (eights * weights).sum(-1, dtype=torch.uint8)  # [B, C, H, NQB, block_q / 8]
    if block_q < 64:
        packed = torch.nn.functional.pad(packed, (0, 8 - block_q // 8))
    words = packed.contiguous().view(torch.int64)[..., 0]  # [B, C, H, NQB]
    return words.permute(0, 2, 3, 1)


def chunk_lists(words: torch.Tensor, chunk_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """words int64 [B, H, NQB, C] (row_words), chunk_ids int32 [C, KB] (the key blocks of each
    chunk) -> (block_index int32 [B, H, NQB, MAXK], block_count int32 [B, H, NQB], row_mask
    int64 [B, H, NQB, MAXK]): per query block, the key blocks of each chunk with a nonzero
    word, in chunk order, each carrying that word. One host read (MAXC)."""
    from attnrt.kernels.block_sparse import block_mask_to_index

    kb = chunk_ids.shape[1]
    # The listed chunks of each query block first, in increasing order, and their count.
    order, per_block = block_mask_to_index(words != 0)
    maxc = max(1, int(per_block.max().item()))
    order = order[..., :maxc].long()
    shape = (*order.shape[:3], maxc * kb)
    index = chunk_ids[order].reshape(shape)  # [B, H, NQB, MAXC, KB] -> [..., MAXK]
    row_mask = words.gather(-1, order)[..., None].expand(*order.shape, kb).reshape(shape)
    return index.contiguous(), per_block * kb, row_mask.contiguous()


def _kv_heads_per_pass(select: torch.Tensor, hkv: int, block_q: int) -> int:
    b, c, h, n = select.shape
    per_kv_head = 2 * b * c * (h // hkv) * -(-n // block_q) * block_q
    return max(1, PACKED_BYTES_BUDGET // per_kv_head)


def block_lists(select: torch.Tensor, hkv: int, chunk_ids: torch.Tensor, block_q: int,
                kv_heads_per_call: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """select bool [B, C, H, N] -> the kernel's (block_index, block_count, row_mask) for all
    heads (chunk_lists), the row bits packed in groups of `kv_heads_per_call` key/value heads
    (default: as many as keep a pass under PACKED_BYTES_BUDGET)."""
    h = select.shape[2]
    group = h // hkv
    step = kv_heads_per_call or _kv_heads_per_pass(select, hkv, block_q)
    parts = [row_words(select[:, :, k0 * group:(k0 + step) * group], block_q)
             for k0 in range(0, hkv, step)]
    words = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return chunk_lists(words, chunk_ids)


def vmoba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, select: torch.Tensor,
                    chunk: int, scale: float, block_q: int = 64, block_k: int = 64,
                    kv_heads_per_call: int | None = None) -> torch.Tensor:
    """q [B, N, H, D], k/v [B, N, Hkv, D] in chunk order, select bool [B, C, H, N] (chunks of
    `chunk` tokens) -> out [B, N, H, D]: each query's attention over the union of its selected
    chunks, in one block-sparse kernel call over all heads (differentiable in q, k, v).

    block_q: 16, 32 or 64 (one row-mask bit per query row). `kv_heads_per_call` bounds the
    heads whose selection is bit-packed at once (default: PACKED_BYTES_BUDGET); the kernel
    itself runs once.

    Equivalent PyTorch: softmax(q k^T * scale, masked to keys in the selected chunks) v.
    """
    from attnrt.kernels.block_sparse import block_sparse_attention

    if block_q not in ROW_MASK_BLOCK_Q or isinstance(block_q, bool):
        raise SparseArgumentError(f"block_q={block_q!r} is not supported by {METHOD}; allowed: "
                                  "16, 32, 64 (one row-mask bit per query row)")
    n = q.shape[1]
    valid, chunk_ids, _ = key_blocks(n, chunk, block_k, q.device)
    index, count, row_mask = block_lists(select, k.shape[2], chunk_ids, block_q,
                                         kv_heads_per_call)
    kp, vp = padded_keys(k, chunk, block_k), padded_keys(v, chunk, block_k)
    out = block_sparse_attention(q, kp, vp, index, count, block_q=block_q, block_k=block_k,
                                 key_block_valid=valid, row_mask=row_mask, softmax_scale=scale)
    return cast(torch.Tensor, out)
