"""FLASH_ATTN_3: FlashAttention-3 for Hopper (`flash_attn_interface.flash_attn_func`).

Shapes: B batch, N query length, M key length, H heads, Hkv kv heads, D head size. Takes
[B, N, H, D] as is, GQA natively, causal mask bottom-right aligned (as attnrt's).

Documented call (flash-attention/hopper/flash_attn_interface.py; there is no dropout_p):
    flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None,
                    k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
                    softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
                    sm_margin=0, return_attn_probs=False)
Current builds return `out`; the 2024 betas returned `(out, softmax_lse)`, so a tuple is unpacked.
"""

from __future__ import annotations

import importlib

import torch

from attnrt.interfaces import AttentionBackend, AttentionMetadata, ScaledImpl
from attnrt.selection.capability import Package

MODULE = "flash_attn_interface"


class FlashAttn3Impl(ScaledImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        fn = importlib.import_module(MODULE).flash_attn_func
        out = fn(query, key, value, softmax_scale=self.softmax_scale, causal=self.causal)
        return out[0] if isinstance(out, tuple) else out


class FlashAttn3Backend(AttentionBackend):
    """Hopper only (wgmma and TMA); the head sizes every FA3 build compiles."""

    PLATFORMS = frozenset({"cuda"})
    ARCHS = ("sm90", "sm90a")
    DTYPES = frozenset({"fp16", "bf16"})
    HEAD_SIZES = (64, 96, 128, 192, 256)
    PACKAGES = (Package(MODULE, dist="flash-attn-3", min_version="3.0.0b1", below_version="4",
                        hint="build FlashAttention-3 from source: git clone "
                             "https://github.com/Dao-AILab/flash-attention && cd "
                             "flash-attention/hopper && python setup.py install"),)

    @staticmethod
    def get_name() -> str:
        return "FLASH_ATTN_3"

    @staticmethod
    def get_impl_cls() -> type[FlashAttn3Impl]:
        return FlashAttn3Impl
