"""FLASH_ATTN: FlashAttention-2 (`flash_attn.flash_attn_func`), on CUDA and on ROCm.

Shapes: B batch, N query length, M key length, H heads, Hkv kv heads, D head size. flash_attn
takes [B, N, H, D] as is (no transpose), does GQA natively (H % Hkv == 0) and, since 2.1, aligns
the causal mask bottom-right, as attnrt does. The ROCm build (Composable Kernel or Triton
backend) ships the same `flash_attn_func`, so one adapter serves both platforms.

Documented call (flash_attn 2.x, flash_attn/flash_attn_interface.py):
    flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    deterministic=False, return_attn_probs=False) -> out [B, N, H, D]
"""

from __future__ import annotations

import importlib

import torch

from attnrt.interfaces import AttentionBackend, AttentionMetadata, ScaledImpl
from attnrt.selection.capability import Package

MODULE = "flash_attn"


class FlashAttnImpl(ScaledImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        # Imported here, after the availability check has already imported it once.
        fn = importlib.import_module(MODULE).flash_attn_func
        return fn(query, key, value, dropout_p=0.0, softmax_scale=self.softmax_scale,
                  causal=self.causal)


class FlashAttnBackend(AttentionBackend):
    """Ampere, Ada and Hopper (sm80..sm90); MI200/MI300 (gfx90a, gfx942, gfx950) on ROCm."""

    PLATFORMS = frozenset({"cuda", "rocm"})
    ARCHS = (">=sm80,<sm100", "gfx90a", "gfx942", "gfx950")
    DTYPES = frozenset({"fp16", "bf16"})
    HEAD_SIZES = range(8, 257, 8)  # any D <= 256 runs (padded to 8 inside); these waste nothing
    PACKAGES = (Package(MODULE, dist="flash-attn", min_version="2.5", below_version="3",
                        hint="pip install flash-attn --no-build-isolation (NVIDIA); on ROCm, "
                             "build flash-attention from source with GPU_ARCHS set to your gfx "
                             "arch, e.g. GPU_ARCHS=gfx942"),)

    @staticmethod
    def get_name() -> str:
        return "FLASH_ATTN"

    @staticmethod
    def get_impl_cls() -> type[FlashAttnImpl]:
        return FlashAttnImpl
