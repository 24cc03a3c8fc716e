"""TORCH_SDPA: torch.nn.functional.scaled_dot_product_attention, letting PyTorch pick its kernel.

Causal with N != M uses a bottom-right aligned mask (FlashAttention's convention, shared by every
attnrt backend); SDPA's own is_causal is top-left aligned, so it is used only when N == M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnrt.interfaces import AttentionBackend, AttentionMetadata, ScaledImpl


def sdpa_bnhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              scale: float | None) -> torch.Tensor:
    """SDPA on [B, N, H, D] tensors (GQA through enable_gqa) -> [B, N, H, D]."""
    n, m = q.shape[1], k.shape[1]
    if causal and n > m:
        # Rows i < N - M see no key (zeros); the last M rows are a square causal problem. Through
        # the lower-right mask, cuDNN and efficient returned wrong rows here (H100, torch 2.11).
        tail = sdpa_bnhd(q[:, n - m:], k, v, True, scale)
        return torch.cat((tail.new_zeros((q.shape[0], n - m, *tail.shape[2:])), tail), dim=1)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = qt.shape[1] != kt.shape[1]
    if causal and n != m:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(n, m)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale,
                                             enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale,
                                             enable_gqa=gqa)
    return out.transpose(1, 2)


class TorchSdpaImpl(ScaledImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        return sdpa_bnhd(query, key, value, self.causal, self.softmax_scale)


class TorchSdpaBackend(AttentionBackend):
    """Any platform PyTorch runs on; PyTorch chooses flash, cuDNN, efficient or math inside."""

    DTYPES = frozenset({"fp16", "bf16", "fp32", "fp64"})

    @staticmethod
    def get_name() -> str:
        return "TORCH_SDPA"

    @staticmethod
    def get_impl_cls() -> type[TorchSdpaImpl]:
        return TorchSdpaImpl
