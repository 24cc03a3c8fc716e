"""SAGE_ATTN: SageAttention 2 (`sageattention.sageattn`), 8-bit quantized attention.

Shapes: B batch, N query length, M key length, H heads, Hkv kv heads, D head size. Called with
tensor_layout="NHD", i.e. [B, N, H, D] as is; GQA natively (H % Hkv == 0).

Documented call (thu-ml/SageAttention, sageattention/core.py):
    sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False)
It dispatches by compute capability (sm80, sm86, sm89, sm90, sm120; anything else raises) and
pads D to 64 or 128 (D > 128 raises). Its causal mask is defined only for N == M, so a causal call
with N != M is refused as a KernelCompileError and the layer moves to the next ranked backend.

Q and K are quantized to int8 (P and V to fp8 on sm89+): outputs differ from exact attention by
more than fp16 rounding. The shipped manifest therefore never ranks SAGE_ATTN; choose it with
ATTNRT_BACKEND=SAGE_ATTN or an override file.
"""

from __future__ import annotations

import importlib

import torch

from attnrt.errors import KernelCompileError
from attnrt.interfaces import AttentionBackend, AttentionMetadata, ScaledImpl
from attnrt.support import Package

MODULE = "sageattention"


class SageAttnImpl(ScaledImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        n, m = query.shape[1], key.shape[1]
        if self.causal and n != m:
            raise KernelCompileError(f"causal=True with N={n} != M={m} is not supported by "
                                     "SAGE_ATTN; supported: causal only when N == M")
        fn = importlib.import_module(MODULE).sageattn
        return fn(query, key, value, tensor_layout="NHD", is_causal=self.causal,
                  sm_scale=self.softmax_scale)


class SageAttnBackend(AttentionBackend):
    """The archs sageattn dispatches on; D up to 128."""

    PLATFORMS = frozenset({"cuda"})
    ARCHS = ("sm80", "sm86", "sm89", "sm90", "sm120")
    DTYPES = frozenset({"fp16", "bf16"})
    HEAD_SIZES = range(8, 129, 8)
    PACKAGES = (Package(MODULE, dist="sageattention", min_version="2.0", below_version="3",
                        hint="pip install sageattention --no-build-isolation "
                             "(SageAttention 2.x; needs triton and a CUDA toolkit)"),)

    @staticmethod
    def get_name() -> str:
        return "SAGE_ATTN"

    @staticmethod
    def get_impl_cls() -> type[SageAttnImpl]:
        return SageAttnImpl
