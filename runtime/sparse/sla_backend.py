"""SLA_ATTN, SAGE_SLA_ATTN and VMOBA_ATTN: backend classes (capability as data) for the sparse
methods "sla", "sage_sla" and "vmoba", with FastVideo's names. Not registered here: the
integrator wires the methods.

Shapes: B batch, N sequence, H heads, Hkv kv heads, D head size; [B, N, H, D] throughout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..interfaces import AttentionBackend
from ..selection.capability import Package, Reason
from .sage_sla import HINT, SageSLAAttentionImpl
from .sla import SLAAttentionImpl, SLAAttentionMetadata, SLAAttentionMetadataBuilder
from .vmoba import (
    VideoMobaAttentionMetadata,
    VideoMobaAttentionMetadataBuilder,
    VMOBAAttentionImpl,
)

if TYPE_CHECKING:
    from ..selection.device import Device
    from ..selection.request import AttentionRequest

# Head sizes attnrt's block-sparse Triton kernel compiles (padded to a power of two, masked).
KERNEL_HEAD_SIZES = range(16, 257, 8)
TRITON = Package("triton", min_version="3.0", hint="pip install 'triton>=3.0'")
GRAD = "GRAD"  # reason code: a forward-only backend asked for a call with backward


class SLAAttentionBackend(AttentionBackend):
    """SLA on the block-sparse Triton kernel: NVIDIA from Ampere; any token order (replicated
    text tokens may be appended); no causal mask; forward and backward."""

    METHODS: ClassVar[frozenset[str]] = frozenset({"sla"})
    PLATFORMS: ClassVar[frozenset[str]] = frozenset({"cuda"})
    ARCHS: ClassVar[str] = ">=sm80"
    DTYPES: ClassVar[frozenset[str]] = frozenset({"fp16", "bf16", "fp32"})
    HEAD_SIZES: ClassVar[range] = KERNEL_HEAD_SIZES
    SUPPORTS_CAUSAL: ClassVar[bool] = False
    SUPPORTS_GQA: ClassVar[bool] = True
    PACKAGES = (TRITON,)

    @staticmethod
    def get_name() -> str:
        return "SLA_ATTN"

    @staticmethod
    def get_impl_cls() -> type[SLAAttentionImpl]:
        return SLAAttentionImpl

    @staticmethod
    def get_metadata_cls() -> type[SLAAttentionMetadata]:
        return SLAAttentionMetadata

    @staticmethod
    def get_builder_cls() -> type[SLAAttentionMetadataBuilder]:
        return SLAAttentionMetadataBuilder


class SageSLAAttentionBackend(AttentionBackend):
    """SageSLA through SpargeAttn (spas_sage_attn, built from source): int8 q/k, fp8 v, so Ada
    (sm89) and Hopper (sm90); D 64 or 128; no GQA; forward only (a request with grad is
    refused)."""

    METHODS: ClassVar[frozenset[str]] = frozenset({"sage_sla"})
    PLATFORMS: ClassVar[frozenset[str]] = frozenset({"cuda"})
    ARCHS: ClassVar[tuple[str, ...]] = ("sm89", "sm90")
    DTYPES: ClassVar[frozenset[str]] = frozenset({"fp16", "bf16", "fp32"})
    HEAD_SIZES: ClassVar[tuple[int, ...]] = (64, 128)
    SUPPORTS_CAUSAL: ClassVar[bool] = False
    SUPPORTS_GQA: ClassVar[bool] = False
    PACKAGES = (Package("spas_sage_attn", hint=HINT), TRITON)

    @staticmethod
    def get_name() -> str:
        return "SAGE_SLA_ATTN"

    @staticmethod
    def get_impl_cls() -> type[SageSLAAttentionImpl]:
        return SageSLAAttentionImpl

    @staticmethod
    def get_metadata_cls() -> type[SLAAttentionMetadata]:
        return SLAAttentionMetadata

    @staticmethod
    def get_builder_cls() -> type[SLAAttentionMetadataBuilder]:
        return SLAAttentionMetadataBuilder

    @classmethod
    def extra_reasons(cls, request: AttentionRequest, device: Device) -> list[Reason]:
        if request.grad:
            return [Reason(GRAD, "grad=True (a call with backward) is not supported by "
                                 "SAGE_SLA_ATTN; supported: inference only (SpargeAttn's "
                                 "kernels have no backward)", "use SLA_ATTN for training")]
        return []


class VMOBAAttentionBackend(AttentionBackend):
    """VMoBA on the block-sparse Triton kernel: NVIDIA from Ampere; self-attention over the
    latent video grid (no replicated text tokens); no causal mask; forward and backward."""

    METHODS: ClassVar[frozenset[str]] = frozenset({"vmoba"})
    PLATFORMS: ClassVar[frozenset[str]] = frozenset({"cuda"})
    ARCHS: ClassVar[str] = ">=sm80"
    DTYPES: ClassVar[frozenset[str]] = frozenset({"fp16", "bf16", "fp32"})
    HEAD_SIZES: ClassVar[range] = KERNEL_HEAD_SIZES
    SUPPORTS_CAUSAL: ClassVar[bool] = False
    SUPPORTS_GQA: ClassVar[bool] = True
    SUPPORTS_REPLICATED_TOKENS: ClassVar[bool] = False
    PACKAGES = (TRITON,)

    @staticmethod
    def get_name() -> str:
        return "VMOBA_ATTN"

    @staticmethod
    def get_impl_cls() -> type[VMOBAAttentionImpl]:
        return VMOBAAttentionImpl

    @staticmethod
    def get_metadata_cls() -> type[VideoMobaAttentionMetadata]:
        return VideoMobaAttentionMetadata

    @staticmethod
    def get_builder_cls() -> type[VideoMobaAttentionMetadataBuilder]:
        return VideoMobaAttentionMetadataBuilder
