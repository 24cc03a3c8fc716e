"""TORCH_SDPA: torch.nn.functional.scaled_dot_product_attention, letting PyTorch pick its kernel.

Causal with N != M uses a bottom-right aligned mask (FlashAttention's convention, shared by every
attnrt backend); SDPA's own is_causal is top-left aligned, so it is used only when N == M.
"""

from __future__ import annotations

from typing import Any

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
Pair = tuple[torch.Tensor, torch.Tensor]


def _cudnn_lse(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, causal: bool,
               scale: float) -> Pair:
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        qt, kt, vt, None, True, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def _flash_lse(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, causal: bool,
               scale: float) -> Pair:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        qt, kt, vt, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def _efficient_lse(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, causal: bool,
                   scale: float) -> Pair:
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        qt, kt, vt, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse


def _cpu_lse(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, causal: bool,
             scale: float) -> Pair:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qt, kt, vt, 0.0, causal, scale=scale)
    return out, lse


_LSE_OPS = {"CUDNN_ATTENTION": _cudnn_lse, "FLASH_ATTENTION": _flash_lse,
            "EFFICIENT_ATTENTION": _efficient_lse}


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float | None, sdp: str | None = None) -> Pair:
    """SDPA on [B, N, H, D] tensors, also returning lse [B, H, N] float32 (natural log).

    `sdp` names the CUDA kernel ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION");
    None runs the one SDPA itself would pick. The public SDPA returns no lse, so this calls the
    kernel's aten op (the op SDPA dispatches to); on CPU, its flash kernel. The CUDA ops take no
    enable_gqa (kv heads are repeated here) and no head size off a multiple of 8 (zero-padded,
    as SDPA does); where SDPA would take its math path, the chunked reference computes both.
    Causal needs N == M here.
    """
    n, m, d = q.shape[1], k.shape[1], q.shape[3]
    if causal and n != m:
        raise ValueError(f"causal=True with q length {n} != k length {m} is not supported by "
                         "sdpa_with_lse; allowed: causal with equal lengths, or non-causal")
    scale = scale if scale is not None else d ** -0.5
    if k.shape[2] != q.shape[2]:
        group = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    qt, kt, vt = _bhnd(q, k, v)
    op = _cpu_lse if q.device.type == "cpu" else _cuda_lse_op(qt, kt, vt, causal, scale, sdp)
    if op is None:  # SDPA's math path: no fused kernel to ask
        from attnrt.backends.reference import chunked_attention

        out, lse = chunked_attention(q, k, v, causal, scale, return_lse=True)
        return out, lse.float()
    out, lse = op(qt, kt, vt, causal, scale)
    # cuDNN gives [B, H, N, 1], efficient pads N to a multiple of 32: keep [B, H, N].
    lse = lse.reshape(lse.shape[0], lse.shape[1], -1)[..., :n].float()
    return out.transpose(1, 2)[..., :d], lse


def _cuda_lse_op(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, causal: bool,
                 scale: float, sdp: str | None) -> Any:
    """The aten op of `sdp`, or of SDPA's own choice for these [B, H, N, D] tensors (None:
    its math path)."""
    if sdp is None:
        sdp = _SDP_BY_VALUE.get(torch._fused_sdp_choice(qt, kt, vt, None, 0.0, causal,
                                                        scale=scale))
    return _LSE_OPS.get(sdp) if sdp is not None else None


def _bhnd(q: torch.Tensor, k: torch.Tensor,
          v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, H, N, D] views; on CUDA a head size off a multiple of 8 is zero-padded (a copy)."""
    pad = -q.shape[3] % 8 if q.device.type != "cpu" else 0
    qt, kt, vt = ((F.pad(t, (0, pad)) if pad else t).transpose(1, 2) for t in (q, k, v))
    return qt, kt, vt


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
