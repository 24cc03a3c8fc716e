"""One attention call with torch SDPA's arguments, served through attnrt's selection.

Shapes: B batch, N query sequence, M key sequence, H query heads, Hkv kv heads, D head size.
Tensors are [B, N, H, D] (diffusers' dispatcher layout); lse is [B, N, H] float32 as diffusers'
backends return it.

`SdpaRouter.__call__` takes what diffusers' dispatcher hands a backend (attn_mask, dropout_p,
is_causal, scale, enable_gqa, return_lse) and either serves every argument or raises a typed
error naming it: nothing is dropped. Unmasked calls go through a cached `LocalAttention` per
(heads, kv heads, head size, causal, scale); masked ones through `attnrt.integrations.masked`.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch

from attnrt.errors import AttnrtError
from attnrt.integrations import masked
from attnrt.layers import LocalAttention

if TYPE_CHECKING:
    from attnrt.integrations.video_sparse import VideoSparse

Out = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class UnsupportedAttentionArgument(AttnrtError, ValueError):
    """An argument of an attention call that attnrt cannot serve; the message names it."""


def _refuse(name: str, value: Any, allowed: str) -> UnsupportedAttentionArgument:
    return UnsupportedAttentionArgument(f"{name}={value!r} is not supported by attnrt's "
                                        f"diffusers integration; allowed: {allowed}")


def check_call(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None,
               dropout_p: float, is_causal: bool, enable_gqa: bool,
               unknown: dict[str, Any]) -> None:
    """Refuse, before any kernel runs, every argument the router cannot honour."""
    if unknown:
        name = sorted(unknown)[0]
        raise _refuse(name, unknown[name], "query, key, value, attn_mask, dropout_p, is_causal, "
                      "scale, enable_gqa, return_lse, _parallel_config")
    if dropout_p != 0.0:
        raise _refuse("dropout_p", dropout_p, "0.0 (attnrt's backends implement no dropout)")
    if attn_mask is not None and is_causal:
        raise _refuse("is_causal", is_causal, "False when attn_mask is given (as torch's SDPA)")
    if query.dim() != 4 or key.dim() != 4:
        raise _refuse("query.shape", tuple(query.shape), "4-D [B, N, H, D] with key [B, M, Hkv, D]")
    heads, kv_heads = query.shape[2], key.shape[2]
    if heads != kv_heads and not enable_gqa:
        raise _refuse("enable_gqa", enable_gqa, f"True when query has {heads} heads and key "
                      f"{kv_heads} (as torch's SDPA)")
    if heads % kv_heads:
        raise _refuse("key.shape", tuple(key.shape), f"a kv head count dividing {heads}")


class SdpaRouter:
    """Serves SDPA-style calls through attnrt and counts which backend served each.

    `served` counts calls per backend name (the count the tests compare with the model's own
    attention calls), `served_masked` the masked ones among them.
    `supported_attention_backends` is the allow-list every layer gets. `sparse` (a
    VideoSparse) runs the video's self-attention calls with VSA
    (attnrt.integrations.video_sparse).
    """

    def __init__(self, supported_attention_backends: tuple[str, ...] | None = None,
                 sparse: VideoSparse | None = None) -> None:
        from attnrt.integrations.video_sparse import VideoSparseRoute

        self.allowed = supported_attention_backends
        self.video = None if sparse is None else VideoSparseRoute(sparse,
                                                                  supported_attention_backends)
        self.served: Counter[str] = Counter()
        self.served_masked: Counter[str] = Counter()
        self._layers: dict[tuple[Any, ...], LocalAttention] = {}
        self._lock = threading.Lock()

    def layer(self, heads: int, kv_heads: int, head_size: int, causal: bool,
              scale: float | None) -> LocalAttention:
        """The cached layer for this shape (built once; LocalAttention caches its selection)."""
        key = (heads, kv_heads, head_size, causal, scale)
        found = self._layers.get(key)
        if found is None:
            with self._lock:
                found = self._layers.setdefault(key, LocalAttention(
                    heads, head_size, kv_heads, scale, causal, self.allowed,
                    prefix="diffusers"))
        return found

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                 return_lse: bool = False, **unknown: Any) -> Out:
        """query [B, N, H, D], key/value [B, M, Hkv, D] -> out [B, N, H, D] (and lse
        [B, N, H] float32 with return_lse). A [B, M] mask is a key-padding mask, read as
        [B, 1, 1, M] (as diffusers' native backend reads it)."""
        check_call(query, key, attn_mask, dropout_p, is_causal, enable_gqa, unknown)
        if attn_mask is not None and attn_mask.dim() == 2 and (
                tuple(attn_mask.shape) == (query.shape[0], key.shape[1])):
            attn_mask = attn_mask[:, None, None, :]
        if self.video is not None and self.video.serves(query, key):
            self.video.check(attn_mask, is_causal, return_lse)
            out, name = self.video(query, key, value, scale)
            self.served[name] += 1
            return out
        return self.serve(query, key, value, attn_mask, is_causal, scale, return_lse)

    def serve(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None,
              return_lse: bool) -> Out:
        """A call already checked by check_call; the mask broadcasts as torch's SDPA reads it."""
        n, m = query.shape[1], key.shape[1]
        if is_causal and n != m:  # torch's is_causal is top-left aligned, attnrt's bottom-right
            attn_mask, is_causal = masked.causal_top_left(n, m, query.device), False
        if attn_mask is not None:
            return self._masked(query, key, value, attn_mask, scale, return_lse)
        layer = self.layer(query.shape[2], key.shape[2], query.shape[3], is_causal, scale)
        if return_lse:
            out, lse = layer.forward_with_lse(query, key, value)
            self.served[layer.backend_name] += 1
            return out, lse.transpose(1, 2)
        out = layer.forward(query, key, value)  # a private layer: no hooks to run (-0.6 us)
        self.served[layer.backend_name] += 1
        return out

    def _masked(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor, scale: float | None, return_lse: bool) -> Out:
        mask = _broadcastable_mask(mask, query, key)
        layer = self._masked_layer(query.shape[2], key.shape[2], query.shape[3], return_lse)
        name = layer.decision_for(query.dtype, query.device, query.shape[1]).backend or ""
        result = masked.MASKED_KERNELS[name].run(query, key, value, mask, scale, return_lse)
        self.served[name] += 1
        self.served_masked[name] += 1
        if return_lse:
            out, lse = result
            return out, lse.transpose(1, 2)
        return result

    def _masked_layer(self, heads: int, kv_heads: int, head_size: int,
                      return_lse: bool) -> LocalAttention:
        """A selection-only layer whose allow-list is the backends that take a mask (and give
        lse where asked); it never runs, it only selects (cached per dtype and device)."""
        key = ("masked", heads, kv_heads, head_size, return_lse)
        found = self._layers.get(key)
        if found is not None:
            return found
        allowed = masked.masked_names(return_lse)
        if self.allowed is not None:
            allowed = tuple(n for n in allowed if n in self.allowed)
        if not allowed:
            raise _refuse("attn_mask", "<tensor>", "None, since none of the allowed backends "
                          f"{self.allowed} takes a mask"
                          f"{' and returns lse' if return_lse else ''} (those that do: "
                          f"{', '.join(masked.masked_names(return_lse))})")
        with self._lock:
            return self._layers.setdefault(key, LocalAttention(
                heads, head_size, kv_heads, supported_attention_backends=allowed,
                prefix="diffusers-masked"))


def _broadcastable_mask(mask: torch.Tensor, query: torch.Tensor,
                        key: torch.Tensor) -> torch.Tensor:
    """The mask, refused unless it broadcasts to [B, H, N, M] with a bool or floating dtype."""
    b, n, h, m = query.shape[0], query.shape[1], query.shape[2], key.shape[1]
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise _refuse("attn_mask.dtype", mask.dtype, "torch.bool or a floating dtype")
    try:
        if mask.dim() > 4 or torch.broadcast_shapes(mask.shape, (b, h, n, m)) != (b, h, n, m):
            raise RuntimeError
    except RuntimeError:
        raise _refuse("attn_mask.shape", tuple(mask.shape),
                      f"a shape broadcastable to [B, H, N, M] = {[b, h, n, m]}") from None
    return mask
