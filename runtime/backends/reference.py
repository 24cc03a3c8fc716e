"""REFERENCE: pure-torch attention, the numeric ground truth and the last resort everywhere.

Queries are processed in chunks so peak memory is O(N * chunk), not O(N^2): scores for one chunk
of rows are at most `CHUNK_BYTES`. Accumulation is float32 (float64 for float64 inputs).
Causal masks are bottom-right aligned, as in FlashAttention 2.1+: query i sees keys j <= i + M - N;
a row that sees no key outputs zeros.
"""

from __future__ import annotations

import math
from typing import Literal, cast, overload

import torch

from attnrt.interfaces import AttentionBackend, AttentionMetadata, ScaledImpl

CHUNK_BYTES = 64 << 20


@overload
def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = ...,
                      softmax_scale: float | None = ..., chunk_bytes: int = ...,
                      return_lse: Literal[False] = ...) -> torch.Tensor: ...


@overload
def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = ...,
                      softmax_scale: float | None = ..., chunk_bytes: int = ..., *,
                      return_lse: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = ...,
                      softmax_scale: float | None = ..., chunk_bytes: int = ...,
                      return_lse: bool = ...,
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                      softmax_scale: float | None = None, chunk_bytes: int = CHUNK_BYTES,
                      return_lse: bool = False,
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over q [B, N, H, D], k/v [B, M, Hkv, D] (H % Hkv == 0) -> [B, N, H, D].

    With return_lse, also the log-sum-exp of each row's scaled scores, [B, H, N] float32
    (float64 for float64 inputs), natural log; -inf for a causal row that sees no key.

    Equivalent PyTorch (dense, O(N*M) memory):
        s = (q.transpose(1, 2) @ k.repeat_interleave(H // Hkv, 2).transpose(1, 2).mT) * scale
        s = s.masked_fill(causal_bottom_right_mask, -inf)
        out = (s.softmax(-1) @ v.repeat_interleave(H // Hkv, 2).transpose(1, 2)).transpose(1, 2)
    """
    batch, n, heads, dim = q.shape
    m, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim)
    kt = k.to(acc).permute(0, 2, 3, 1).unsqueeze(2)  # [B, Hkv, 1, D, M]
    vt = v.to(acc).transpose(1, 2).unsqueeze(2)  # [B, Hkv, 1, M, Dv]
    rows = max(1, chunk_bytes // max(1, batch * heads * m * torch.finfo(acc).bits // 8))
    chunks, lses = [], []
    for start in range(0, n, rows):
        qc = q[:, start:start + rows].to(acc)
        c = qc.shape[1]
        qc = qc.reshape(batch, c, kv_heads, group, dim).permute(0, 2, 3, 1, 4)  # [B,Hkv,g,c,D]
        s = torch.matmul(qc, kt) * scale  # [B, Hkv, g, c, M]
        if causal:
            mask = _causal_mask(start, c, n, m, q.device)
            s = s.masked_fill(mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = torch.matmul(p, vt)  # [B, Hkv, g, c, Dv]
        if causal and n > m:
            # Rows that see no key (softmax over nothing: NaN) output zeros. Only those: a NaN
            # or inf in the inputs must stay visible in every other row.
            o = o.masked_fill(mask.all(-1, keepdim=True), 0.0)
        chunks.append(o.permute(0, 3, 1, 2, 4).reshape(batch, c, heads, -1).to(q.dtype))
        if return_lse:
            lses.append(torch.logsumexp(s, dim=-1).reshape(batch, heads, c))
    out = torch.cat(chunks, dim=1)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


def _causal_mask(start: int, rows: int, n: int, m: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(start, start + rows, device=device).unsqueeze(1)
    j = torch.arange(m, device=device).unsqueeze(0)
    return j > i + (m - n)


class ReferenceImpl(ScaledImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        out = chunked_attention(query, key, value, self.causal, self.softmax_scale)
        return cast(torch.Tensor, out)  # no lse asked for

    def forward_with_lse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_metadata: AttentionMetadata | None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = chunked_attention(query, key, value, self.causal, self.softmax_scale,
                                     return_lse=True)
        return out, lse.float()


class ReferenceBackend(AttentionBackend):
    """Any platform, dtype and head size; GQA and causal."""

    @staticmethod
    def get_name() -> str:
        return "REFERENCE"

    @staticmethod
    def get_impl_cls() -> type[ReferenceImpl]:
        return ReferenceImpl
