"""Video Sparse Attention for a diffusers video model's self-attention: `VideoSparse`.

Shapes: B batch, N = T' * H' * W' video tokens (the latent grid after patching, in the order
diffusers' video transformers flatten it: frames, then rows, then columns), H query heads, Hkv
key/value heads, D head size; tensors [B, N, H, D] as diffusers' dispatcher hands them.

    from attnrt.integrations import diffusers as attnrt_diffusers
    sparse = attnrt_diffusers.VideoSparse(raw_latent_shape=(21, 60, 104), patch_size=(1, 2, 2),
                                          sparsity=0.875)
    attnrt_diffusers.enable(pipe.transformer, sparse=sparse)

Which calls: a call whose query and key both have the grid's N tokens is the video's
self-attention and runs VSA (method "vsa": the best ranked VSA backend, as `attnrt explain
--method vsa` shows); every other call (cross-attention to text, other lengths) runs dense as
before. A self-attention call VSA cannot serve as asked (a mask, is_causal, return_lse) is
refused with a typed error, never run dense instead.

The gate. VSA's output is coarse * gate_compress + fine, where FastVideo's VSA models compute
gate_compress with a projection trained for it. diffusers' models have no such projection, so
`gate` says what it is: "zeros" (the default: the fine stage alone, over the key cubes the
coarse stage selects) or "ones" (coarse + fine unweighted). Equivalent PyTorch:
attnrt.sparse.vsa_reference.vsa_reference(q, k, v, gate, grid, sparsity).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from attnrt.errors import AttnrtError
from attnrt.layers import LocalAttention
from attnrt.sparse.vsa_metadata import (
    VideoSparseAttentionMetadata,
    VideoSparseAttentionMetadataBuilder,
    check_sparsity,
    dit_shape,
)

GATES = ("zeros", "ones")


class VideoSparseError(AttnrtError, ValueError):
    """A VideoSparse option, or a video self-attention call VSA cannot serve as asked."""


@dataclass(frozen=True)
class VideoSparse:
    """VSA for the self-attention of one video shape: the raw latent (T, H, W), the model's
    patch size (pt, ph, pw), VSA_sparsity in [0, 1) (the share of key cubes dropped), and
    the gate ("zeros" or "ones"; see the module docstring)."""

    raw_latent_shape: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    sparsity: float
    gate: str = "zeros"
    grid: tuple[int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", dit_shape(self.raw_latent_shape, self.patch_size))
        try:
            object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        except ValueError:
            raise VideoSparseError(f"sparsity={self.sparsity!r} is not allowed; allowed: a "
                                   "number in [0, 1) (VSA_sparsity, the share of key cubes "
                                   "dropped)") from None
        if self.gate not in GATES:
            raise VideoSparseError(f"gate={self.gate!r} is not allowed; allowed: "
                                   f"{', '.join(map(repr, GATES))}")

    @property
    def tokens(self) -> int:
        """N, the video's token count: T' * H' * W'."""
        return math.prod(self.grid)


class VideoSparseRoute:
    """Serves the video self-attention calls of one model with VSA; `served` in the router
    counts them under the VSA backend's name."""

    def __init__(self, spec: VideoSparse, allowed: tuple[str, ...] | None) -> None:
        self.spec, self.allowed = spec, allowed
        self._layers: dict[tuple[Any, ...], LocalAttention] = {}
        self._metadata: dict[str, VideoSparseAttentionMetadata] = {}
        self._gates: dict[tuple[Any, ...], torch.Tensor] = {}
        self._lock = threading.Lock()

    def serves(self, query: torch.Tensor, key: torch.Tensor) -> bool:
        return query.shape[1] == key.shape[1] == self.spec.tokens

    def check(self, attn_mask: Any, is_causal: bool, return_lse: bool) -> None:
        """Refuse, before any kernel, what VSA cannot serve on a video self-attention call."""
        if attn_mask is not None:
            raise self._refuse("attn_mask", "<tensor>", "None")
        if is_causal:
            raise self._refuse("is_causal", is_causal, "False")
        if return_lse:
            raise self._refuse("return_lse", return_lse, "False")

    def _refuse(self, name: str, value: Any, allowed: str) -> VideoSparseError:
        return VideoSparseError(f"{name}={value} is not supported on the video self-attention "
                                f"({self.spec.tokens} tokens) routed to VSA; allowed: {allowed} "
                                "(VSA attends the whole grid, non-causally, and returns no lse)")

    def layer(self, heads: int, kv_heads: int, head_size: int,
              scale: float | None) -> LocalAttention:
        key = (heads, kv_heads, head_size, scale)
        found = self._layers.get(key)
        if found is None:
            with self._lock:
                found = self._layers.setdefault(key, LocalAttention(
                    heads, head_size, kv_heads, scale, False, self.allowed,
                    prefix="diffusers-vsa", method="vsa"))
        return found

    def metadata(self, device: torch.device) -> VideoSparseAttentionMetadata:
        """FastVideo's VSA metadata for the grid, built once per device."""
        found = self._metadata.get(str(device))
        if found is None:
            spec = self.spec
            found = VideoSparseAttentionMetadataBuilder().build(
                0, spec.raw_latent_shape, spec.patch_size, spec.sparsity, device)
            self._metadata[str(device)] = found
        return found

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scale: float | None) -> tuple[torch.Tensor, str]:
        """(out [B, N, H, D], the serving backend's name): tile, VSA, untile."""
        layer = self.layer(query.shape[2], key.shape[2], query.shape[3], scale)
        impl = layer.impl_for(query.dtype, query.device)
        md = self.metadata(query.device)
        q, k, v = (impl.preprocess_qkv(t, md) for t in (query, key, value))
        out = impl.postprocess_output(impl.forward(q, k, v, self.gate(q), md),  # type: ignore[call-arg]
                                      md)
        return out, layer.decision_for(query.dtype, query.device).backend or ""

    def gate(self, tiled_q: torch.Tensor) -> torch.Tensor:
        """The constant gate_compress in the tiled layout, built once per shape, dtype and
        device (its padding slots hold the same constant; untiling drops them)."""
        key = (tuple(tiled_q.shape), tiled_q.dtype, str(tiled_q.device))
        found = self._gates.get(key)
        if found is None:
            fill = 0.0 if self.spec.gate == "zeros" else 1.0
            found = self._gates.setdefault(key, torch.full_like(tiled_q, fill))
        return found
