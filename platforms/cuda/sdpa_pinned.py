"""TORCH_SDPA_CUDNN, TORCH_SDPA_FLASH, TORCH_SDPA_EFFICIENT: SDPA pinned to one PyTorch kernel.

Shapes: B batch, N query length, M key length, H heads, Hkv kv heads, D head size; tensors
[B, N, H, D]. Each backend runs `scaled_dot_product_attention` inside
`torch.nn.attention.sdpa_kernel([SDPBackend.X])`, so PyTorch cannot quietly swap in another
kernel: the one named is the one that runs, or the call fails.

Limits are declared as data, from PyTorch's own gates (aten/.../cuda/sdp_utils.cpp):
  cuDNN      sm80..sm121, fp16/bf16, D multiple of 8 and <= 128 (<= 256 on sm90/sm100 with a
             recent cuDNN), GQA through enable_gqa.
  flash      sm80..sm121, fp16/bf16, D <= 256 (multiples of 8 here), GQA through enable_gqa.
  efficient  sm50..sm121, fp16/fp32 (+bf16 on sm80+), D multiple of 8; the PyTorch 2.11 gate
             rejects enable_gqa, so GQA is declared unsupported.
On a real device each backend also asks PyTorch's gate (`torch.backends.cuda.can_use_*`) about a
small tensor of the request's heads, head size and dtype, so limits that depend on the installed
cuDNN or build show up as a reason at selection time instead of a failure at forward.

Causal with N != M: attnrt masks are bottom-right aligned, SDPA's is_causal is top-left. For
N < M the shared `sdpa_bnhd` passes `causal_lower_right(N, M)` (PyTorch routes it to flash or
efficient natively and materializes a dense mask otherwise); for N > M the first N - M rows see no
key and are zeros, and the last M rows are run as a square causal problem (see sdpa_bnhd).
When the pinned kernel refuses a shape at run time ("No available kernel"), the refusal becomes
a KernelCompileError naming the shape, and LocalAttention moves to the next ranked backend (or
raises under ATTNRT_STRICT=1).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, ClassVar

import torch

from attnrt.backends.sdpa import sdpa_bnhd, sdpa_with_lse
from attnrt.errors import KernelCompileError
from attnrt.interfaces import AttentionBackend, AttentionMetadata, ScaledImpl
from attnrt.selection.capability import ARCH, HEAD_SIZE, RUNTIME, Reason
from attnrt.selection.ranges import ArchRange
from attnrt.selection.request import NAME_DTYPES

if TYPE_CHECKING:
    from attnrt.selection.device import Device
    from attnrt.selection.request import AttentionRequest

# What PyTorch says when the enabled kernel refuses the inputs (CUDA dispatch, and the generic one).
_NO_KERNEL = ("No available kernel", "No viable backend for scaled_dot_product_attention")
_GATES = {"CUDNN_ATTENTION": "can_use_cudnn_attention",
          "FLASH_ATTENTION": "can_use_flash_attention",
          "EFFICIENT_ATTENTION": "can_use_efficient_attention"}
_PROBE_SEQ = 128  # long enough for every gate's sequence-length rules, cheap to allocate


def pinned_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                scale: float | None, sdp: str, name: str) -> torch.Tensor:
    """SDPA on [B, N, H, D] tensors with only PyTorch's `sdp` kernel enabled -> [B, N, H, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([getattr(SDPBackend, sdp)]):
            return sdpa_bnhd(q, k, v, causal, scale)
    except RuntimeError as exc:
        if not any(marker in str(exc) for marker in _NO_KERNEL):
            raise  # a CUDA or kernel error: never hidden behind a fallback
        raise KernelCompileError(
            f"{name}: PyTorch's {sdp} kernel refused q{tuple(q.shape)}, k{tuple(k.shape)}, "
            f"{q.dtype}, causal={causal}: {_gate_story(q, k, v, causal, sdp)}") from exc


def _gate_story(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sdp: str) -> str:
    """PyTorch's own reasons (its debug warnings) for refusing these tensors."""
    gate = getattr(torch.backends.cuda, _GATES[sdp], None)
    if gate is None or q.device.type != "cuda":
        return "no kernel accepted the inputs"
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    params = torch.backends.cuda.SDPAParams(qt, kt, vt, None, 0.0, causal,
                                            qt.shape[1] != kt.shape[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gate(params, True)
    return "; ".join(str(w.message) for w in caught) or "no kernel accepted the inputs"


def torch_gate_reasons(sdp: str, name: str, request: AttentionRequest,
                       device: Device) -> tuple[Reason, ...]:
    """Ask PyTorch's gate for `sdp` about a [1, 128, H, D] input of the request (real GPUs only).

    Not cached here: the dispatcher caches the decision, and an uncached gate never goes stale.
    """
    gate = getattr(torch.backends.cuda, _GATES[sdp], None)
    if device.simulated or gate is None or not torch.cuda.is_available():
        return ()
    dtype = NAME_DTYPES[request.dtype]
    q = torch.empty(1, _PROBE_SEQ, request.num_heads, request.head_size, dtype=dtype,
                    device="cuda")
    kv = torch.empty(1, _PROBE_SEQ, request.kv_heads, request.head_size, dtype=dtype,
                     device="cuda")
    params = torch.backends.cuda.SDPAParams(q.transpose(1, 2), kv.transpose(1, 2),
                                            kv.transpose(1, 2), None, 0.0, request.causal,
                                            request.is_gqa)
    if gate(params, False):
        return ()
    story = _gate_story(q, kv, kv, request.causal, sdp)
    return (Reason(RUNTIME, f"torch {torch.__version__} refuses {name} for "
                            f"{request.describe()} on this GPU: {story}"),)


class _PinnedSdpaImpl(ScaledImpl):
    SDP: ClassVar[str]
    NAME: ClassVar[str]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        return pinned_sdpa(query, key, value, self.causal, self.softmax_scale, self.SDP,
                           self.NAME)

    def forward_with_lse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_metadata: AttentionMetadata | None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return sdpa_with_lse(query, key, value, self.causal, self.softmax_scale, self.SDP)
        except RuntimeError as exc:
            if not any(marker in str(exc) for marker in _NO_KERNEL):
                raise
            raise KernelCompileError(f"{self.NAME}: PyTorch's {self.SDP} kernel refused "
                                     f"q{tuple(query.shape)}, k{tuple(key.shape)}, "
                                     f"{query.dtype} when asked for the lse: {exc}") from exc


class CudnnSdpaImpl(_PinnedSdpaImpl):
    SDP, NAME = "CUDNN_ATTENTION", "TORCH_SDPA_CUDNN"


class FlashSdpaImpl(_PinnedSdpaImpl):
    SDP, NAME = "FLASH_ATTENTION", "TORCH_SDPA_FLASH"


class EfficientSdpaImpl(_PinnedSdpaImpl):
    SDP, NAME = "EFFICIENT_ATTENTION", "TORCH_SDPA_EFFICIENT"


class _PinnedSdpaBackend(AttentionBackend):
    PLATFORMS = frozenset({"cuda"})
    IMPL: ClassVar[type[_PinnedSdpaImpl]]

    @classmethod
    def extra_reasons(cls, request: AttentionRequest, device: Device) -> list[Reason]:
        return list(torch_gate_reasons(cls.IMPL.SDP, cls.IMPL.NAME, request, device))


class CudnnSdpaBackend(_PinnedSdpaBackend):
    """cuDNN's fused attention. D > 128 only on sm90/sm100-class parts (and a recent cuDNN)."""

    ARCHS = ">=sm80,<=sm121"
    DTYPES = frozenset({"fp16", "bf16"})
    HEAD_SIZES = range(8, 257, 8)
    WIDE_HEAD_ARCHS = ("sm90", ">=sm100,<sm110")  # PyTorch's is_sm90_or_sm10x
    IMPL = CudnnSdpaImpl

    @staticmethod
    def get_name() -> str:
        return "TORCH_SDPA_CUDNN"

    @staticmethod
    def get_impl_cls() -> type[CudnnSdpaImpl]:
        return CudnnSdpaImpl

    @classmethod
    def extra_reasons(cls, request: AttentionRequest, device: Device) -> list[Reason]:
        wide = ArchRange.parse(cls.WIDE_HEAD_ARCHS)
        if request.head_size > 128 and not wide.contains(device.platform, device.arch):
            return [Reason(HEAD_SIZE, f"head_size={request.head_size} is not supported by "
                                      f"TORCH_SDPA_CUDNN on arch={device.arch}; supported: "
                                      f"8..128 step 8 (up to 256 on {wide})")]
        return super().extra_reasons(request, device)


class FlashSdpaBackend(_PinnedSdpaBackend):
    """PyTorch's bundled FlashAttention-2."""

    ARCHS = ">=sm80,<=sm121"
    DTYPES = frozenset({"fp16", "bf16"})
    HEAD_SIZES = range(8, 257, 8)
    IMPL = FlashSdpaImpl

    @staticmethod
    def get_name() -> str:
        return "TORCH_SDPA_FLASH"

    @staticmethod
    def get_impl_cls() -> type[FlashSdpaImpl]:
        return FlashSdpaImpl


class EfficientSdpaBackend(_PinnedSdpaBackend):
    """PyTorch's memory-efficient (xformers CUTLASS) kernel; the one that takes float32."""

    ARCHS = ">=sm50,<=sm121"
    DTYPES = frozenset({"fp16", "bf16", "fp32"})
    HEAD_SIZES = range(8, 257, 8)
    SUPPORTS_GQA = False  # PyTorch 2.11's gate rejects enable_gqa for this kernel
    BF16_ARCHS = ">=sm80"
    IMPL = EfficientSdpaImpl

    @staticmethod
    def get_name() -> str:
        return "TORCH_SDPA_EFFICIENT"

    @staticmethod
    def get_impl_cls() -> type[EfficientSdpaImpl]:
        return EfficientSdpaImpl

    @classmethod
    def extra_reasons(cls, request: AttentionRequest, device: Device) -> list[Reason]:
        if request.dtype == "bf16" and not ArchRange.parse(cls.BF16_ARCHS).contains(
                device.platform, device.arch):
            return [Reason(ARCH, f"arch={device.arch} is not supported by TORCH_SDPA_EFFICIENT "
                                 f"with dtype=bf16; supported: {cls.BF16_ARCHS}")]
        return super().extra_reasons(request, device)
