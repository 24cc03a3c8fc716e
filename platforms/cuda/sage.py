"""SAGE_ATTN: SageAttention (`sageattention.sageattn`), 8-bit quantized attention, 1.x and 2.x.

Shapes: B batch, N query length, M key length, H heads, Hkv kv heads, D head size. Called with
tensor_layout="NHD", i.e. [B, N, H, D] as is; GQA natively (H % Hkv == 0).

Documented calls (thu-ml/SageAttention, sageattention/core.py):
    2.x  sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False)
         CUDA kernels per compute capability (sm80, sm86, sm89, sm90, sm120); D padded to 64 or
         128 (D > 128 raises).
    1.x  sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True)
         Triton kernels (PyPI's pure-Python wheel); D in {64, 96, 128} only. Its smooth_k
         subtracts the keys' mean *in place* from the caller's k, so the adapter passes the
         smoothed copy itself with smooth_k=False: same result, the caller's k untouched.
The causal mask is defined only for N == M, so a causal call with N != M is refused as a
KernelCompileError and the layer moves to the next ranked backend.

Q and K are quantized to int8 (P and V to fp8 on sm89+ in 2.x): outputs differ from exact
attention by more than fp16 rounding. The shipped manifest therefore never ranks SAGE_ATTN;
choose it with ATTNRT_BACKEND=SAGE_ATTN or an override file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch
from packaging.version import InvalidVersion, Version

from attnrt.errors import KernelCompileError
from attnrt.interfaces import AttentionBackend, AttentionMetadata, ScaledImpl
from attnrt.selection.capability import HEAD_SIZE, Package, Reason, package_status

if TYPE_CHECKING:
    from attnrt.selection.device import Device
    from attnrt.selection.request import AttentionRequest

MODULE = "sageattention"


V1_HEAD_SIZES = (64, 96, 128)


def installed_major() -> int | None:
    """Major version of the installed sageattention (None: missing or unreadable); read through
    the package check, so it is cached and forgotten with attnrt.clear_caches()."""
    version = package_status(SageAttnBackend.PACKAGES[0]).version
    try:
        return Version(version).major if version else None
    except InvalidVersion:
        return None


class SageAttnImpl(ScaledImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        n, m = query.shape[1], key.shape[1]
        if self.causal and n != m:
            raise KernelCompileError(f"causal=True with N={n} != M={m} is not supported by "
                                     "SAGE_ATTN; supported: causal only when N == M")
        fn = importlib.import_module(MODULE).sageattn
        if installed_major() == 1:  # smooth the keys here: 1.x would do it in place on `key`
            return fn(query, key - key.mean(dim=1, keepdim=True), value, tensor_layout="NHD",
                      is_causal=self.causal, sm_scale=self.softmax_scale, smooth_k=False)
        return fn(query, key, value, tensor_layout="NHD", is_causal=self.causal,
                  sm_scale=self.softmax_scale)


class SageAttnBackend(AttentionBackend):
    """The archs sageattn dispatches on; D up to 128."""

    PLATFORMS = frozenset({"cuda"})
    ARCHS = ("sm80", "sm86", "sm89", "sm90", "sm120")
    DTYPES = frozenset({"fp16", "bf16"})
    HEAD_SIZES = range(8, 129, 8)
    BACKWARD_PLATFORMS = frozenset()  # sageattn is forward-only: no gradient would flow
    PACKAGES = (Package(MODULE, dist="sageattention", min_version="1.0.6", below_version="3",
                        hint="pip install sageattention --no-build-isolation (2.x, CUDA "
                             "kernels; needs a CUDA toolkit) or pip install sageattention==1.0.6 "
                             "(Triton only)"),)

    @classmethod
    def extra_reasons(cls, request: AttentionRequest, device: Device) -> list[Reason]:
        if request.head_size in V1_HEAD_SIZES or device.simulated or installed_major() != 1:
            return []
        return [Reason(HEAD_SIZE, f"head_size={request.head_size} is not supported by SAGE_ATTN "
                                  f"with sageattention 1.x; supported: "
                                  f"{', '.join(map(str, V1_HEAD_SIZES))} (2.x: 8..128)")]

    @staticmethod
    def get_name() -> str:
        return "SAGE_ATTN"

    @staticmethod
    def get_impl_cls() -> type[SageAttnImpl]:
        return SageAttnImpl
