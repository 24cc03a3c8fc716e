"""FastVideo-compatible VSA metadata and its builder, with VSA's typed input errors.

Shapes: N = T * H * W video tokens (after patching), C cubes, S = 64 * C tiled slots (see
attnrt.sparse.vsa_layout). `VideoSparseAttentionMetadataBuilder().build(current_timestep,
raw_latent_shape, patch_size, VSA_sparsity, device)` matches FastVideo's signature; the layout
tensors are built once per (shape, device) and shared by every metadata of that shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AttnrtError
from ..interfaces import AttentionMetadata, AttentionMetadataBuilder
from .vsa_layout import CUBE_TOKENS, num_tiles, tile_layout


class VSAInputError(AttnrtError, ValueError):
    """A VSA argument (latent shape, sparsity, gate, metadata, tensor shape) is not allowed."""


class VSATypeError(AttnrtError, TypeError):
    """A VSA argument has a type or dtype that is not allowed."""


@dataclass(kw_only=True)
class VideoSparseAttentionMetadata(AttentionMetadata):
    """FastVideo's fields: the patched latent grid, its cubes, the layout tensors, sparsity."""

    dit_seq_shape: list[int]
    num_tiles: list[int]
    total_seq_length: int
    tile_partition_indices: torch.Tensor
    reverse_tile_partition_indices: torch.Tensor
    variable_block_sizes: torch.Tensor  # int32 [C], as FastVideo builds it
    non_pad_index: torch.Tensor
    untile_combined_index: torch.Tensor
    VSA_sparsity: float = 0.0  # noqa: N815 - FastVideo's name
    tile_buf: torch.Tensor | None = None  # FastVideo's per-step buffer; attnrt allocates per call
    cache_tile_buf: bool = True

    @property
    def padded_seq_length(self) -> int:
        """S: slots of the tiled layout (64 per cube)."""
        return math.prod(self.num_tiles) * CUBE_TOKENS


def cur_topk(sparsity: float, n_cubes: int) -> int:
    """Key cubes each query cube keeps: ceil((1 - sparsity) * C), within [1, C] (FastVideo)."""
    return max(1, min(math.ceil((1 - sparsity) * n_cubes), n_cubes))


def _triple(name: str, value: object) -> tuple[int, int, int]:
    ok = (isinstance(value, (tuple, list, torch.Size)) and len(value) == 3
          and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value))
    if not ok:
        raise VSAInputError(f"{name}={value!r} is not allowed; expected three ints >= 1 "
                            "(T, H, W)")
    return tuple(value)  # type: ignore[return-value, arg-type]


def check_sparsity(value: object) -> float:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and 0 <= value < 1)
    if not ok:
        raise VSAInputError(f"VSA_sparsity={value!r} is not allowed; expected a number in [0, 1)")
    return float(value)  # type: ignore[arg-type]


def dit_shape(raw_latent_shape: object, patch_size: object) -> tuple[int, int, int]:
    """The patched latent grid (T, H, W) = raw_latent_shape // patch_size, each at least 1."""
    raw = _triple("raw_latent_shape", raw_latent_shape)
    patch = _triple("patch_size", patch_size)
    shape = tuple(r // p for r, p in zip(raw, patch, strict=True))
    if min(shape) < 1:
        raise VSAInputError(f"raw_latent_shape={raw} with patch_size={patch} is not allowed; "
                            f"each latent size must be at least its patch size")
    return shape  # type: ignore[return-value]


class VideoSparseAttentionMetadataBuilder(AttentionMetadataBuilder):
    """FastVideo's builder: build(current_timestep, raw_latent_shape, patch_size, VSA_sparsity,
    device, cache_tile_buf=True, **kwargs)."""

    def __init__(self) -> None:
        pass

    def prepare(self) -> None:
        pass

    def build(  # type: ignore[override]
        self,
        current_timestep: int,
        raw_latent_shape: tuple[int, int, int],
        patch_size: tuple[int, int, int],
        VSA_sparsity: float,  # noqa: N803 - FastVideo's name
        device: torch.device,
        cache_tile_buf: bool = True,
        **kwargs: Any,
    ) -> VideoSparseAttentionMetadata:
        shape = dit_shape(raw_latent_shape, patch_size)
        sparsity = check_sparsity(VSA_sparsity)
        layout = tile_layout(shape, torch.device(device))
        return VideoSparseAttentionMetadata(
            current_timestep=current_timestep, dit_seq_shape=list(shape),
            num_tiles=list(num_tiles(shape)), total_seq_length=math.prod(shape),
            VSA_sparsity=sparsity, cache_tile_buf=cache_tile_buf, **layout)
