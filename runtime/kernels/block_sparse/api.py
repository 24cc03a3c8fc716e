"""The public entry of the block-sparse kernel: checks, then the Triton path (autograd-aware).

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size,
NQB = ceil(N / block_q), NKB = ceil(M / block_k), MAXK the length of each block list.
"""

from __future__ import annotations

import torch

from .checks import check_inputs


def block_sparse_attention(
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
    """Block-sparse flash attention over q [B, N, H, D] and k, v [B, M, Hkv, D].

    block_index int32 [B, H, NQB, MAXK]: the key blocks query block i visits (the first
    block_count[b, h, i] entries; the rest are ignored; used entries distinct, in [0, NKB));
    block_count int32 [B, H, NQB]; key_block_valid int32 [NKB] or None: tokens valid at the
    start of each key block (None: every block full except the tail). row_mask int64
    [B, H, NQB, MAXK] or None (block_q <= 64 only): bit r of row_mask[b, h, i, j] says whether
    row r of query block i attends key block block_index[b, h, i, j] (a clear bit: that block's
    keys are masked, -inf scores, for that row); None: every row attends every listed block.
    Expanded (stride-0) views are read as they are. Returns out [B, N, H, D] in q's dtype
    and, with return_lse, lse [B, H, N] float32 (natural log); a row that visits no valid key
    gets out = 0, lse = -inf.
    Differentiable in q, k, v. The Triton backward sums dQ per query block over its own list,
    so every gradient is deterministic; the Gluon backward on Hopper (off unless switched on,
    options.GLUON_BACKWARD) adds dQ by TMA reduce-adds in a varying order, and is not taken
    with deterministic=True or torch.use_deterministic_algorithms(True).

    Equivalent PyTorch: `block_sparse_attention_reference` (same signature).
    The contents of the lists are checked on CPU tensors, and on CUDA only with
    ATTNRT_BLOCK_SPARSE_CHECKS=1 (the check reads them back to the host).
    """
    index, count, valid, mask = check_inputs(
        q, k, v, block_index, block_count, block_q, block_k, key_block_valid, softmax_scale,
        {"return_lse": return_lse, "deterministic": deterministic}, kernel=True,
        row_mask=row_mask)
    from .launch import run  # imports Triton

    out, lse = run(q, k, v, index, count, valid, block_q, block_k, softmax_scale, mask,
                   deterministic)
    return (out, lse) if return_lse else out
