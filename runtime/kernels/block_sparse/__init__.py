"""Block-sparse flash attention: each query block visits a list of key blocks.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size,
NQB = ceil(N / block_q), NKB = ceil(M / block_k). The kernel serves VSA's fine stage, SLA's
sparse branch, VMoBA's chunks, masks compiled by the engine and users' own block lists.

`block_sparse_attention` is the Triton kernel (autograd-aware); its meaning is
`block_sparse_attention_reference` (pure torch, float64-capable); `block_mask_to_index` turns a
bool block mask into the lists both take. Importing this package needs torch alone.
"""

from __future__ import annotations

from .api import block_sparse_attention
from .checks import BlockSparseInputError, BlockSparseTypeError
from .reference import block_mask_to_index, block_sparse_attention_reference, index_to_block_mask

__all__ = [
    "BlockSparseInputError",
    "BlockSparseTypeError",
    "block_mask_to_index",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "index_to_block_mask",
]
