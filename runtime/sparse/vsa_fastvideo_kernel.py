"""FASTVIDEO_KERNEL_VSA: VSA (method "vsa") through the `fastvideo-kernel` package's
video_sparse_attn (ThunderKittens on sm90, Triton elsewhere), on attnrt's tile layout and
metadata. An adapter: the package computes; attnrt checks, tiles and untiles.

Shapes: B batch, S = 64 * C tiled slots, H heads, D head size; the impl takes [B, S, H, D] (as
VIDEO_SPARSE_ATTN does) and hands the package its [B, H, S, D] layout, as FastVideo's own
backend does. The package fixes the softmax scale at D^-0.5 and needs as many kv heads as
query heads.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import torch

from ..errors import BackendUnavailableError
from ..selection.capability import Package, package_status
from .vsa_backend import VideoSparseAttentionBackend, VideoSparseAttentionImpl
from .vsa_layout import VSA_TILE_SIZE
from .vsa_metadata import VideoSparseAttentionMetadata, VSAInputError

NAME = "FASTVIDEO_KERNEL_VSA"
PACKAGE = Package("fastvideo_kernel", dist="fastvideo-kernel",
                  hint="pip install fastvideo-kernel (Hopper wheels; see FastVideo's docs)")


def vendor_function() -> Any:
    """fastvideo_kernel.video_sparse_attn, or BackendUnavailableError with the install hint."""
    status = package_status(PACKAGE)
    if status.reason is not None:
        raise BackendUnavailableError(f"{NAME} cannot run: {status.reason}")
    return importlib.import_module(PACKAGE.module).video_sparse_attn


class FastVideoKernelVSAImpl(VideoSparseAttentionImpl):
    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "",
                 **extra_impl_args: Any) -> None:
        super().__init__(num_heads, head_size, softmax_scale, causal, num_kv_heads, prefix,
                         **extra_impl_args)
        if abs(softmax_scale - head_size ** -0.5) > 1e-12 * head_size ** -0.5:
            raise VSAInputError(f"softmax_scale={softmax_scale} is not allowed for {NAME}; the "
                                f"package fixes it at head_size**-0.5 = {head_size ** -0.5}")

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        gate_compress: torch.Tensor,
        attn_metadata: VideoSparseAttentionMetadata,
    ) -> torch.Tensor:
        """Tiled [B, S, H, D] in and out; the package sees [B, H, S, D]."""
        sizes, topk = self.cubes(query, key, gate_compress, attn_metadata)
        if key.shape[2] != query.shape[2]:
            raise VSAInputError(f"num_kv_heads={key.shape[2]} is not allowed for {NAME}; it "
                                f"must equal num_heads={query.shape[2]}")
        fn = vendor_function()
        q, k, v, g = (t.transpose(1, 2).contiguous() for t in (query, key, value, gate_compress))
        out = fn(q, k, v, sizes, sizes, topk, block_size=VSA_TILE_SIZE, compress_attn_weight=g)
        return out.transpose(1, 2)


class FastVideoKernelVSABackend(VideoSparseAttentionBackend):
    """fastvideo-kernel's VSA: bf16, D 64 or 128, no GQA; refused with the install hint when
    the package is absent."""

    PLATFORMS: ClassVar[frozenset[str]] = frozenset({"cuda"})
    ARCHS: ClassVar[str | None] = ">=sm80"  # type: ignore[misc]
    DTYPES: ClassVar[frozenset[str]] = frozenset({"bf16"})
    HEAD_SIZES: ClassVar[tuple[int, ...]] = (64, 128)  # type: ignore[assignment]
    SUPPORTS_GQA: ClassVar[bool] = False
    PACKAGES = (PACKAGE,)

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[FastVideoKernelVSAImpl]:
        return FastVideoKernelVSAImpl
