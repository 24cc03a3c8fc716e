"""SDPA_CHUNKED: scaled_dot_product_attention over query chunks, so peak memory is O(N * chunk).

Shapes: B batch, N query sequence, M key sequence, H query heads, Hkv key/value heads, D head size.
Inputs q [B, N, H, D], k/v [B, M, Hkv, D]; output [B, N, H, D].

Why: on MPS, SDPA for more than 8 query rows runs PyTorch's MPSGraph math path, which materialises
the whole [B, H, N, M] score matrix (upcast to float32). At long video-model sequences that is many
GiB, fails past Metal's buffer limits (pytorch/pytorch#149261) and, past 2**32 score elements,
returns wrong results (pytorch/pytorch#179352). Softmax is row-wise, so running SDPA on slices of
query rows is exact: each slice's scores are at most `chunk_bytes` and under 2**31 elements.

Causal masks are bottom-right aligned (query i sees keys j <= i + M - N). A chunk of rows
[s, e) with s >= N - M sees keys [0, e + M - N), and its mask within that slice is again
bottom-right aligned, so every chunk is one plain SDPA call on a key prefix (fewer keys, less
work). Rows i < N - M see no key and output zeros, as in REFERENCE.

Equivalent PyTorch: `attnrt.backends.sdpa.sdpa_bnhd(q, k, v, causal, softmax_scale)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from attnrt.backends.sdpa import sdpa_bnhd
from attnrt.interfaces import AttentionBackend, AttentionMetadata, ScaledImpl

if TYPE_CHECKING:
    pass

CHUNK_BYTES = 256 << 20  # scores of one chunk; MPS computes them in float32
MAX_SCORE_ELEMENTS = 2**31 - 1  # below MPSGraph's 2**32-element SDPA corruption, int32-safe


def chunk_rows(batch: int, heads: int, keys: int, itemsize: int,
               chunk_bytes: int = CHUNK_BYTES) -> int:
    """Query rows per chunk so one chunk's scores stay within `chunk_bytes` and 2**31 elements."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes} is not supported by SDPA_CHUNKED; "
                         "expected a positive number of bytes")
    per_row = max(1, batch * heads * keys)
    by_bytes = chunk_bytes // (per_row * max(4, itemsize))
    return max(1, min(by_bytes, MAX_SCORE_ELEMENTS // per_row))


def chunked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                 softmax_scale: float | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """SDPA on q [B, N, H, D], k/v [B, M, Hkv, D] -> [B, N, H, D], one query chunk at a time.

    Equivalent PyTorch (O(N * M) memory): sdpa_bnhd(q, k, v, causal, softmax_scale).
    """
    batch, n, heads, _ = q.shape
    m = k.shape[1]
    rows = chunk_rows(batch, heads, m, q.element_size(), chunk_bytes)
    first = max(0, n - m) if causal else 0  # causal rows before this see no key at all
    pieces = [q.new_zeros(batch, first, heads, v.shape[-1])] if first else []
    for start in range(first, n, rows):
        stop = min(n, start + rows)
        keys = stop + m - n if causal else m
        pieces.append(sdpa_bnhd(q[:, start:stop], k[:, :keys], v[:, :keys], causal,
                                softmax_scale))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


class SdpaChunkedImpl(ScaledImpl):
    """`chunk_bytes` (extra impl arg) overrides the per-chunk score budget."""

    EXTRA_IMPL_ARGS = frozenset({"chunk_bytes"})

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "",
                 **extra_impl_args: Any) -> None:
        super().__init__(num_heads, head_size, softmax_scale, causal, num_kv_heads, prefix,
                         **extra_impl_args)
        self.chunk_bytes = int(extra_impl_args.get("chunk_bytes", CHUNK_BYTES))
        chunk_rows(1, 1, 1, 4, self.chunk_bytes)  # reject a bad budget at construction

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        return chunked_sdpa(query, key, value, self.causal, self.softmax_scale, self.chunk_bytes)


class SdpaChunkedBackend(AttentionBackend):
    """Memory-bounded SDPA for long sequences on MPS; portable torch code, so CPU runs it too.

    fp64 is refused on MPS and bf16 before macOS 14 (`dtype_rules`); CPU takes every dtype.
    """

    PLATFORMS = frozenset({"mps", "cpu"})
    DTYPES = frozenset({"fp16", "bf16", "fp32", "fp64"})
    SUPPORTS_CAUSAL = True
    SUPPORTS_GQA = True

    @staticmethod
    def get_name() -> str:
        return "SDPA_CHUNKED"

    @staticmethod
    def get_impl_cls() -> type[SdpaChunkedImpl]:
        return SdpaChunkedImpl
