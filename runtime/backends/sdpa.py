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


# SDPA's kernels by SDPBackend value (torch._fused_sdp_choice answers with these numbers).
_SDP_BY_VALUE = {1: "FLASH_ATTENTION", 2: "EFFICIENT_ATTENTION", 3: "CUDNN_ATTENTION"}


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float | None, sdp: str | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA on [B, N, H, D] tensors, also returning lse [B, H, N] float32 (natural log).

    `sdp` names the kernel ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"); None
    runs the one SDPA itself would pick for these tensors. The public SDPA returns no lse, so
    this calls the kernel's aten op (the same op SDPA dispatches to). Where SDPA would take its
    math path, the chunked reference computes both. Causal needs N == M here.
    """
    n, m = q.shape[1], k.shape[1]
    if causal and n != m:
        raise ValueError(f"causal=True with q length {n} != k length {m} is not supported by "
                         "sdpa_with_lse; allowed: causal with equal lengths, or non-causal")
    if k.shape[2] != q.shape[2]:  # the aten ops take no enable_gqa
        group = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    aten = torch.ops.aten
    if q.device.type == "cpu" and sdp is None and q.dtype != torch.float16:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, causal,
                                                                     scale=scale)
    else:
        if sdp is None:
            sdp = _SDP_BY_VALUE.get(torch._fused_sdp_choice(qt, kt, vt, None, 0.0, causal,
                                                            scale=scale))
        if sdp == "CUDNN_ATTENTION":
            out, lse = aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0,
                                                                causal, False, scale=scale)[:2]
        elif sdp == "FLASH_ATTENTION":
            out, lse = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False,
                                                                scale=scale)[:2]
        elif sdp == "EFFICIENT_ATTENTION":
            out, lse = aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0,
                                                                    causal, scale=scale)[:2]
        else:
            from attnrt.backends.reference import chunked_attention

            out, lse = chunked_attention(q, k, v, causal, scale, return_lse=True)
            return out, lse.float()
    # cuDNN gives [B, H, N, 1], efficient pads N to a multiple of 32: keep [B, H, N].
    lse = lse.reshape(lse.shape[0], lse.shape[1], -1)[..., :n].float()
    return out.transpose(1, 2), lse


class TorchSdpaImpl(ScaledImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        return sdpa_bnhd(query, key, value, self.causal, self.softmax_scale)

    def forward_with_lse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_metadata: AttentionMetadata | None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        return sdpa_with_lse(query, key, value, self.causal, self.softmax_scale)


class TorchSdpaBackend(AttentionBackend):
    """Any platform PyTorch runs on; PyTorch chooses flash, cuDNN, efficient or math inside."""

    DTYPES = frozenset({"fp16", "bf16", "fp32", "fp64"})

    @staticmethod
    def get_name() -> str:
        return "TORCH_SDPA"

    @staticmethod
    def get_impl_cls() -> type[TorchSdpaImpl]:
        return TorchSdpaImpl
