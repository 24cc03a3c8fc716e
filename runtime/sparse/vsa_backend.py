"""VIDEO_SPARSE_ATTN: attnrt's VSA (method "vsa") on its block-sparse Triton kernel, with
FastVideo's backend, impl, metadata and builder names and signatures.

Shapes: B batch, N video tokens (grid order), S = 64 * C tiled slots, H heads, Hkv kv heads,
D head size; [B, N, H, D] throughout. As in FastVideo, preprocess_qkv tiles [q; k; v; gate]
(N tokens -> S slots), forward(query, key, value, gate_compress, attn_metadata) runs on the
tiled layout, postprocess_output untiles (S -> N); DistributedAttention_VSA calls the three in
that order after its all-to-all. Registered in attnrt.backends.BACKENDS; ranked for method
vsa in capability.yaml.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..interfaces import AttentionBackend, ScaledImpl
from ..selection.capability import ARCH, PLATFORM, Package, Reason
from .vsa import check_gate_and_length, video_sparse_attention
from .vsa_layout import CUBE_TOKENS, tile, untile
from .vsa_metadata import (
    VideoSparseAttentionMetadata,
    VideoSparseAttentionMetadataBuilder,
    VSAInputError,
    cur_topk,
)

if TYPE_CHECKING:
    from ..selection.device import Device
    from ..selection.request import AttentionRequest

NAME = "VIDEO_SPARSE_ATTN"


def _sm_major(arch: str | None) -> int | None:
    digits = "".join(ch for ch in (arch or "").removeprefix("sm") if ch.isdigit())
    return int(digits[:-1]) if len(digits) >= 2 else None


def check_metadata(attn_metadata: object) -> VideoSparseAttentionMetadata:
    if not isinstance(attn_metadata, VideoSparseAttentionMetadata):
        raise VSAInputError(
            f"attn_metadata={type(attn_metadata).__name__} is not allowed for {NAME}; expected "
            "VideoSparseAttentionMetadata (VideoSparseAttentionMetadataBuilder().build(...), "
            "given through set_forward_context(attn_metadata=...))")
    return attn_metadata


class VideoSparseAttentionImpl(ScaledImpl[VideoSparseAttentionMetadata]):
    """VSA for one layer; softmax_scale scales coarse and fine scores (FastVideo: D^-0.5)."""

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "",
                 **extra_impl_args: Any) -> None:
        if causal:
            raise VSAInputError(f"causal=True is not allowed for {NAME}; allowed: False")
        super().__init__(num_heads, head_size, softmax_scale, causal, num_kv_heads, prefix,
                         **extra_impl_args)

    @staticmethod
    def check_attn_metadata(attn_metadata: object, seq_len: int | None) -> None:
        """The metadata a layer of seq_len video tokens needs; DistributedAttention_VSA calls
        this before its exchanges, so every rank refuses before any data moves."""
        md = check_metadata(attn_metadata)
        if seq_len is not None and seq_len != md.total_seq_length:
            raise VSAInputError(
                f"original_seq_len={seq_len} is not allowed with latent grid "
                f"{tuple(md.dit_seq_shape)}; expected T * H * W = {md.total_seq_length} tokens")

    def tile(self, x: torch.Tensor, attn_metadata: VideoSparseAttentionMetadata) -> torch.Tensor:
        """[B', N, Hx, D] tokens -> [B', S, Hx, D] slots (padding zero)."""
        md = check_metadata(attn_metadata)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != md.total_seq_length:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise VSAInputError(
                f"qkv.shape={got} is not allowed for latent grid {tuple(md.dit_seq_shape)}; "
                f"expected [B, {md.total_seq_length}, H, D] (T * H * W tokens)")
        return tile(x, md.tile_partition_indices, md.non_pad_index, md.padded_seq_length)

    def untile(self, x: torch.Tensor, untile_combined_index: torch.Tensor) -> torch.Tensor:
        return untile(x, untile_combined_index)

    def preprocess_qkv(self, qkv: torch.Tensor,
                       attn_metadata: VideoSparseAttentionMetadata) -> torch.Tensor:
        return self.tile(qkv, attn_metadata)

    def postprocess_output(self, output: torch.Tensor,
                           attn_metadata: VideoSparseAttentionMetadata) -> torch.Tensor:
        md = check_metadata(attn_metadata)
        if output.dim() != 4 or output.shape[1] != md.padded_seq_length:
            raise VSAInputError(f"output.shape={tuple(output.shape)} is not allowed; expected "
                                f"[B, {md.padded_seq_length}, H, D] (the tiled layout)")
        return self.untile(output, md.untile_combined_index)

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        gate_compress: torch.Tensor,
        attn_metadata: VideoSparseAttentionMetadata,
    ) -> torch.Tensor:
        """Tiled query, gate_compress [B, S, H, D], key, value [B, S, Hkv, D] -> [B, S, H, D]."""
        sizes, topk = self.cubes(query, key, gate_compress, attn_metadata)
        return video_sparse_attention(query, key, value, gate_compress, sizes, topk,
                                      self.softmax_scale)

    @staticmethod
    def cubes(query: torch.Tensor, key: torch.Tensor, gate_compress: object,
              attn_metadata: object) -> tuple[torch.Tensor, int]:
        """(per-cube valid counts int32 [C], contiguous; key cubes kept per query cube) of a
        checked metadata, after the gate and sequence-length checks every VSA impl makes."""
        md = check_metadata(attn_metadata)
        sizes = md.variable_block_sizes.to(torch.int32).contiguous()
        check_gate_and_length(query, key, gate_compress, sizes.numel() * CUBE_TOKENS)
        return sizes, cur_topk(md.VSA_sparsity, sizes.numel())


class VideoSparseAttentionBackend(AttentionBackend):
    """VSA on attnrt's block-sparse Triton kernel: NVIDIA from Ampere (bf16 dots), 64-token
    cubes, any head size the kernel takes, GQA; no causal mask, no replicated (text) tokens.
    On CPU only under Triton's interpreter (TRITON_INTERPRET=1: tests, gloo checks)."""

    METHODS: ClassVar[frozenset[str]] = frozenset({"vsa"})
    PLATFORMS: ClassVar[frozenset[str]] = frozenset({"cuda", "cpu"})
    ARCHS: ClassVar[str | None] = None  # cuda: from sm80, in extra_reasons (cpu has no sm arch)
    DTYPES: ClassVar[frozenset[str]] = frozenset({"fp16", "bf16", "fp32"})
    HEAD_SIZES: ClassVar[range] = range(16, 257, 8)
    SUPPORTS_CAUSAL: ClassVar[bool] = False
    SUPPORTS_GQA: ClassVar[bool] = True
    SUPPORTS_REPLICATED_TOKENS: ClassVar[bool] = False
    ACCEPTS_GATE_COMPRESS: ClassVar[bool] = True
    PACKAGES = (Package("triton", min_version="3.0", hint="pip install 'triton>=3.0'"),)
    accept_output_buffer: ClassVar[bool] = False

    @classmethod
    def extra_reasons(cls, request: AttentionRequest, device: Device) -> list[Reason]:
        if device.platform == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return [Reason(PLATFORM, f"{NAME} runs on CPU only under Triton's interpreter",
                           "set TRITON_INTERPRET=1 before triton is imported (slow; for tests)")]
        major = _sm_major(device.arch) if device.platform == "cuda" else None
        if major is not None and major < 8:
            return [Reason(ARCH, f"arch={device.arch} is not supported by {NAME}; supported: "
                                 "sm80 and newer", "use a GPU from Ampere on")]
        return []

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[VideoSparseAttentionImpl]:
        return VideoSparseAttentionImpl

    @staticmethod
    def get_metadata_cls() -> type[VideoSparseAttentionMetadata]:
        return VideoSparseAttentionMetadata

    @staticmethod
    def get_builder_cls() -> type[VideoSparseAttentionMetadataBuilder]:
        return VideoSparseAttentionMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        """FastVideo's accessor, from the class's HEAD_SIZES (so subclasses need none)."""
        return list(cls.HEAD_SIZES or ())
