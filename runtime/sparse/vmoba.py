"""VMoBA (video mixture of block attention) on attnrt's block-sparse kernel, FastVideo-compatible.

Shapes: B batch, N = T * Hp * Wp tokens (the latent patch grid), H query heads, Hkv key/value
heads, D head size; q/k/v [B, N, H, D] as every attnrt impl (self-attention: M == N).

Layers cycle through chunk shapes by index: with L = temporal_layer + spatial_layer + st_layer
and i = layer_idx - first_full_layer, layer i uses temporal chunks while i % L <
temporal_layer, then spatial, then spatio-temporal (FastVideo's rule; the layer index is parsed
from the impl's prefix, "...blocks.<i>..."). Tokens are put in chunk order
(attnrt.sparse.vmoba_layout), each (query, head) selects chunks (attnrt.sparse.vmoba_select),
and the attention over the selected chunks runs on the block-sparse kernel: per query block the
union of its rows' chunks, with a per-row bit mask (attnrt.sparse.vmoba_pack). Forward and
backward; no flash-attn dependency.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnrt.interfaces import AttentionImpl, AttentionMetadata, AttentionMetadataBuilder

from .method_errors import SparseArgumentError, SparseMetadataError, check_qkv
from .vmoba_layout import Chunk, check_chunk, from_chunk_order, to_chunk_order
from .vmoba_pack import ROW_MASK_BLOCK_Q, vmoba_attention
from .vmoba_select import METHOD, check_selection, select_chunks

_LAYER_INDEX = re.compile(r"blocks\.(\d+)")


def layer_idx_from_prefix(prefix: str) -> int:
    """The transformer-block index in a layer prefix such as "transformer.blocks.7.attn1"."""
    match = _LAYER_INDEX.search(prefix or "")
    if match is None:
        raise SparseArgumentError(f"prefix={prefix!r} names no layer index, which {METHOD} "
                                  "needs; allowed: a prefix containing 'blocks.<int>'")
    return int(match.group(1))


@dataclass
class VideoMobaAttentionMetadata(AttentionMetadata):
    """FastVideo's VMoBA step data; chunk sizes in patches (temporal: frames). Defaults are
    FastVideo's wan_1.3B_77_480_832 settings. first_full_step is for the pipeline (dense
    attention for the first steps, as FastVideo's); the impl does not read it."""

    current_timestep: int = 0
    temporal_chunk_size: int = 2
    temporal_topk: int = 3
    spatial_chunk_size: Sequence[int] = (3, 4)
    spatial_topk: int = 20
    st_chunk_size: Sequence[int] = (4, 6, 4)
    st_topk: int = 15
    moba_select_mode: str = "threshold"
    moba_threshold: float = 0.25
    moba_threshold_type: str = "query_head"
    patch_resolution: Sequence[int] = ()
    first_full_step: int = 12
    first_full_layer: int = 0
    temporal_layer: int = 1
    spatial_layer: int = 1
    st_layer: int = 1


class VideoMobaAttentionMetadataBuilder(AttentionMetadataBuilder[VideoMobaAttentionMetadata]):
    """FastVideo's builder: the patch grid is raw_latent_shape / patch_size (each divisible)."""

    def prepare(self) -> None:
        """Nothing to reset between steps."""

    def build(self, current_timestep: int, raw_latent_shape: Sequence[int],  # type: ignore[override]
              patch_size: Sequence[int], temporal_chunk_size: int, temporal_topk: int,
              spatial_chunk_size: Sequence[int], spatial_topk: int,
              st_chunk_size: Sequence[int], st_topk: int, moba_select_mode: str = "threshold",
              moba_threshold: float = 0.25, moba_threshold_type: str = "query_head",
              device: torch.device | None = None, first_full_layer: int = 0,
              first_full_step: int = 12, temporal_layer: int = 1, spatial_layer: int = 1,
              st_layer: int = 1, **kwargs: Any) -> VideoMobaAttentionMetadata:
        if len(raw_latent_shape) != 3 or len(patch_size) != 3 or any(
                r % p for r, p in zip(raw_latent_shape, patch_size, strict=True)):
            raise SparseArgumentError(f"raw_latent_shape={tuple(raw_latent_shape)} is not "
                                      f"allowed with patch_size={tuple(patch_size)}; allowed: "
                                      "three sizes, each divisible by its patch size")
        grid = [r // p for r, p in zip(raw_latent_shape, patch_size, strict=True)]
        meta = VideoMobaAttentionMetadata(
            current_timestep, temporal_chunk_size, temporal_topk, spatial_chunk_size,
            spatial_topk, st_chunk_size, st_topk, moba_select_mode, moba_threshold,
            moba_threshold_type, grid, first_full_step, first_full_layer, temporal_layer,
            spatial_layer, st_layer)
        check_metadata(meta)
        return meta


def check_metadata(meta: VideoMobaAttentionMetadata) -> None:
    """Typed errors for every setting, before anything runs."""
    grid = tuple(meta.patch_resolution)
    if len(grid) != 3 or not all(isinstance(g, int) and g >= 1 for g in grid):
        raise SparseMetadataError(f"patch_resolution={grid} is not allowed; allowed: three "
                                  "positive ints (T, Hp, Wp)")
    for name in ("temporal_layer", "spatial_layer", "st_layer"):
        if not isinstance(getattr(meta, name), int) or getattr(meta, name) < 0:
            raise SparseMetadataError(f"{name}={getattr(meta, name)!r} is not allowed; "
                                      "allowed: an int >= 0")
    if meta.temporal_layer + meta.spatial_layer + meta.st_layer < 1:
        raise SparseMetadataError("temporal_layer + spatial_layer + st_layer = 0 is not "
                                  "allowed; allowed: at least one layer kind")
    for kind, count in (("temporal", meta.temporal_layer), ("spatial", meta.spatial_layer),
                        ("st", meta.st_layer)):
        if count:
            check_chunk(f"{kind}_chunk_size", getattr(meta, f"{kind}_chunk_size"), grid)
            check_selection(meta.moba_select_mode, meta.moba_threshold_type,
                            meta.moba_threshold, getattr(meta, f"{kind}_topk"))


def layer_chunk(layer_idx: int, meta: VideoMobaAttentionMetadata) -> tuple[Chunk, int]:
    """(chunk size, topk) of this layer: temporal, spatial or st by its place in the cycle."""
    cycle = meta.temporal_layer + meta.spatial_layer + meta.st_layer
    place = (layer_idx - meta.first_full_layer) % cycle
    if place < meta.temporal_layer:
        return meta.temporal_chunk_size, meta.temporal_topk
    if place < meta.temporal_layer + meta.spatial_layer:
        return tuple(meta.spatial_chunk_size), meta.spatial_topk
    return tuple(meta.st_chunk_size), meta.st_topk


class VMOBAAttentionImpl(AttentionImpl):
    """VMoBA for one layer: forward(query, key, value [B, N, H, D] / [B, N, Hkv, D],
    VideoMobaAttentionMetadata) -> [B, N, H, D]. FastVideo's signature; `block_q`/`block_k`
    (64, 64) pick the kernel tiles (block_q at most 64: one row-mask bit per query row)."""

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float,
                 causal: bool = False, num_kv_heads: int | None = None, prefix: str = "",
                 block_q: int = 64, block_k: int = 64, **extra_impl_args: Any) -> None:
        if causal is not False:
            raise SparseArgumentError(f"causal={causal!r} is not supported by {METHOD}; "
                                      "allowed: False")
        if extra_impl_args:
            raise SparseArgumentError(f"extra_impl_args={sorted(extra_impl_args)} are not "
                                      f"supported by {METHOD}; allowed: block_q, block_k")
        for name, value, allowed in (("block_q", block_q, ROW_MASK_BLOCK_Q),
                                     ("block_k", block_k, (16, 32, 64, 128))):
            if value not in allowed or isinstance(value, bool):
                raise SparseArgumentError(f"{name}={value!r} is not supported by {METHOD}; "
                                          f"allowed: {', '.join(map(str, allowed))}")
        self.num_heads, self.head_size = num_heads, head_size
        self.num_kv_heads = num_kv_heads or num_heads
        self.softmax_scale = softmax_scale if softmax_scale else head_size ** -0.5
        self.causal, self.prefix = causal, prefix
        self.layer_idx = layer_idx_from_prefix(prefix)
        self.block_q, self.block_k = block_q, block_k

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        check_qkv(METHOD, self.head_size, query, key, value)
        meta = self._metadata(attn_metadata, query, key)
        chunk, topk = layer_chunk(self.layer_idx, meta)
        grid = tuple(meta.patch_resolution)
        tokens = check_chunk("chunk_size", chunk, grid)
        q, k, v = (to_chunk_order(t, grid, chunk) for t in (query, key, value))
        select = select_chunks(q, k, tokens, meta.moba_select_mode, meta.moba_threshold_type,
                               meta.moba_threshold, topk)
        out = vmoba_attention(q, k, v, select, tokens, self.softmax_scale, self.block_q,
                              self.block_k)
        return from_chunk_order(out, grid, chunk)

    def _metadata(self, attn_metadata: object, query: torch.Tensor,
                  key: torch.Tensor) -> VideoMobaAttentionMetadata:
        if not isinstance(attn_metadata, VideoMobaAttentionMetadata):
            raise SparseMetadataError(
                f"attn_metadata={type(attn_metadata).__name__} is not allowed for {METHOD} "
                f"(layer {self.prefix!r}); allowed: VideoMobaAttentionMetadata (build it with "
                "VideoMobaAttentionMetadataBuilder and set it in the forward context)")
        check_metadata(attn_metadata)
        grid = tuple(attn_metadata.patch_resolution)
        if query.shape[1] != grid[0] * grid[1] * grid[2] or key.shape[1] != query.shape[1]:
            raise SparseMetadataError(
                f"sequence length N={query.shape[1]} (keys {key.shape[1]}) does not match "
                f"patch_resolution={grid}; allowed: N == M == {grid[0] * grid[1] * grid[2]}")
        return attn_metadata
