"""SLA's block selection: which key blocks each query block attends exactly.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size,
NQB = ceil(N / block_q), NKB = ceil(M / block_k).

The published rule (SLA, thu-ml/SLA `get_block_map`, FastVideo's copy): mean-pool q per query
block and k per key block, after centring k over the sequence (k minus its mean: SageAttention's
smooth-k); score each (query block, key block) pair by the dot product of the pooled vectors; each
query block keeps the `topk = min(NKB, int(topk_ratio * NKB))` best-scoring key blocks.

Differences from upstream, each deliberate: pooling and scoring accumulate in float32 (float64
for float64 inputs) where upstream pools in the input's dtype; a ratio so small that topk is 0
raises (upstream's kernel then divides 0 by 0 and returns NaN); GQA keys are pooled once per
key/value head and read by each query head of its group.
"""

from __future__ import annotations

import torch

from .method_errors import SparseArgumentError, check_ratio


def mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [B, N, H, D] -> [B, H, ceil(N / block), D]: the mean of each block of `block` tokens
    (the tail block averages the tokens it has), in float32 (float64 for float64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, n, h, d = x.shape
    full = n // block
    parts = []
    if full:
        parts.append(x[:, :full * block].reshape(b, full, block, h, d).sum(2, dtype=acc) / block)
    if n > full * block:
        parts.append(x[:, full * block:].sum(1, keepdim=True, dtype=acc) / (n - full * block))
    return torch.cat(parts, dim=1).transpose(1, 2)


def selected_count(topk_ratio: float, num_key_blocks: int) -> int:
    """Key blocks each query block keeps: min(NKB, int(topk_ratio * NKB)), at least 1 or an
    error (a ratio that keeps nothing would leave the sparse branch empty)."""
    topk = min(num_key_blocks, int(topk_ratio * num_key_blocks))
    if topk < 1:
        raise SparseArgumentError(
            f"topk_ratio={topk_ratio!r} keeps no key block of {num_key_blocks}; allowed: "
            f"topk_ratio >= 1/{num_key_blocks} at this key length and block size")
    return topk


def block_scores(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """q [B, N, H, D], k [B, M, Hkv, D] -> pooled scores [B, H, NQB, NKB] (float32/64)."""
    pooled_q = mean_pool(q, block_q)
    # Pooling is linear: pool(k - mean(k)) = pool(k) - mean(k), with no centred copy of k.
    pooled_k = mean_pool(k, block_k) - k.mean(dim=1, dtype=pooled_q.dtype)[:, :, None]
    pooled_k = pooled_k.repeat_interleave(q.shape[2] // k.shape[2], dim=1)
    return pooled_q @ pooled_k.transpose(-1, -2)


def select_blocks(q: torch.Tensor, k: torch.Tensor, topk_ratio: float, block_q: int,
                  block_k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """q [B, N, H, D], k [B, M, Hkv, D] -> (block_index int32 [B, H, NQB, topk], block_count
    int32 [B, H, NQB] (all topk), topk): the key blocks each query block attends exactly.

    Equivalent PyTorch (per query block i): the topk largest of
    mean(q[i-th block]) . mean((k - k.mean(seq))[j-th block]) over key blocks j.
    """
    ratio = check_ratio("topk_ratio", topk_ratio)
    scores = block_scores(q, k, block_q, block_k)
    topk = selected_count(ratio, scores.shape[-1])
    index = torch.topk(scores, topk, dim=-1, sorted=False).indices.to(torch.int32)
    count = torch.full(scores.shape[:3], topk, dtype=torch.int32, device=q.device)
    return index, count, topk


def get_block_map(q: torch.Tensor, k: torch.Tensor, topk_ratio: float, BLKQ: int = 64,  # noqa: N803
                  BLKK: int = 64) -> tuple[torch.Tensor, torch.Tensor, int]:  # noqa: N803
    """FastVideo's spelling and layout: q, k [B, H, L, D] -> (sparse_map int8 [B, H, NQB, NKB],
    lut int64 [B, H, NQB, topk], topk)."""
    index, _, topk = select_blocks(q.transpose(1, 2), k.transpose(1, 2), topk_ratio, BLKQ, BLKK)
    lut = index.long()
    nkb = -(-k.shape[2] // BLKK)
    sparse_map = torch.zeros((*lut.shape[:3], nkb), dtype=torch.int8, device=q.device)
    sparse_map.scatter_(-1, lut, 1)
    return sparse_map, lut, topk
