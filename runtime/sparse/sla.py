"""SLA (sparse-linear attention) on attnrt's block-sparse kernel, FastVideo-compatible.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size;
q [B, N, H, D], k/v [B, M, Hkv, D], as every attnrt impl.

out = sparse + proj_l(linear):
- sparse: exact attention of each query block over its top `topk_ratio` key blocks
  (`attnrt.sparse.block_select`), through `attnrt.kernels.block_sparse.block_sparse_attention`
  with block_q=BLKQ, block_k=BLKK, in bf16 (use_bf16=True) or fp16, as FastVideo's impl;
- linear: phi(Q)(phi(K)^T V)/(phi(Q) . sum phi(K)) over every key (FastVideo, released SLA) or,
  with fused_linear=True, over only the key blocks the sparse branch skipped (the paper's);
- proj_l: nn.Linear(D, D) in float32, initialised to zero (so a fresh layer is the sparse branch
  alone); its keys are `proj_l.weight` / `proj_l.bias`, as FastVideo's, so under a layer that
  registers the impl as `attn_impl` a FastVideo SLA checkpoint loads unchanged.

The sparse branch scales scores by the layer's softmax_scale (upstream's kernel always uses
D**-0.5; the two agree at the default). Equivalent PyTorch: attnrt.sparse.sla_reference.

The ratio: metadata.topk_ratio where the step's metadata sets one (not None), else the
layer's own. FastVideo's metadata defaults to 0.5 and so overrides every layer's ratio;
here a default-built SLAAttentionMetadata carries None and leaves it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from attnrt.interfaces import AttentionImpl, AttentionMetadata, AttentionMetadataBuilder

from .block_select import select_blocks
from .linear_branch import FEATURE_MAPS, linear_attention, unvisited_linear_attention
from .method_errors import (
    CheckpointShapeError,
    SparseArgumentError,
    check_choice,
    check_qkv,
    check_ratio,
)

# Block sizes the block-sparse kernel compiles (attnrt.kernels.block_sparse checks).
BLOCK_SIZES = (16, 32, 64, 128)
METHOD = "SLA_ATTN"


@dataclass
class SLAAttentionMetadata(AttentionMetadata):
    """Per-step SLA data: `topk_ratio` None leaves each layer's own ratio in force."""

    current_timestep: int = 0
    topk_ratio: float | None = None


class SLAAttentionMetadataBuilder(AttentionMetadataBuilder[SLAAttentionMetadata]):
    """Builds SLAAttentionMetadata per step; other backends' step kwargs are accepted and not
    read (a pipeline passes one set of kwargs to whichever builder its backend has)."""

    def prepare(self) -> None:
        """Nothing to reset between steps."""

    def build(self, current_timestep: int = 0, topk_ratio: float | None = None,  # type: ignore[override]
              **kwargs: Any) -> SLAAttentionMetadata:
        if topk_ratio is not None:
            check_ratio("topk_ratio", topk_ratio)
        return SLAAttentionMetadata(current_timestep=current_timestep, topk_ratio=topk_ratio)


def step_ratio(layer_ratio: float, attn_metadata: object) -> float:
    """The ratio in force: the metadata's where it sets one, else the layer's."""
    ratio = getattr(attn_metadata, "topk_ratio", None)
    return layer_ratio if ratio is None else check_ratio("attn_metadata.topk_ratio", ratio)


def check_sla_args(head_size: int, causal: object, topk_ratio: float, feature_map: str,
                   blocks: tuple[int, int] | None) -> None:
    """Typed errors for SLA constructor arguments, before any kernel runs."""
    if causal is not False:
        raise SparseArgumentError(f"causal={causal!r} is not supported by {METHOD}; allowed: "
                                  "False (pass impl arguments by keyword)")
    check_ratio("topk_ratio", topk_ratio)
    check_choice("feature_map", feature_map, tuple(FEATURE_MAPS), METHOD)
    if blocks is not None:
        check_choice("BLKQ", blocks[0], BLOCK_SIZES, METHOD)
        check_choice("BLKK", blocks[1], BLOCK_SIZES, METHOD)
    if not isinstance(head_size, int) or head_size < 1:
        raise SparseArgumentError(f"head_size={head_size!r} is not supported by {METHOD}; "
                                  "allowed: a positive int")


class SLAAttentionImpl(AttentionImpl, nn.Module):
    """SLA for one layer: forward(query [B, N, H, D], key/value [B, M, Hkv, D], metadata)
    -> [B, N, H, D] in query's dtype; differentiable in q, k, v and proj_l.

    FastVideo's signature (pass arguments by keyword: its order differs from AttentionImpl's).
    Beyond it: fused_linear (linear branch over the unvisited key blocks only) and
    compute_dtype (the sparse branch's dtype; when given it wins over use_bf16, e.g.
    torch.float32 for exact tests).
    """

    def __init__(self, num_heads: int, head_size: int, causal: bool = False,
                 softmax_scale: float | None = None, num_kv_heads: int | None = None,
                 prefix: str = "", topk_ratio: float = 0.1, feature_map: str = "softmax",
                 BLKQ: int = 128, BLKK: int = 64, use_bf16: bool = True,  # noqa: N803
                 fused_linear: bool = False, compute_dtype: torch.dtype | None = None,
                 **extra_impl_args: Any) -> None:
        nn.Module.__init__(self)
        check_sla_args(head_size, causal, topk_ratio, feature_map, (BLKQ, BLKK))
        if extra_impl_args:
            raise SparseArgumentError(f"extra_impl_args={sorted(extra_impl_args)} are not "
                                      f"supported by {METHOD}; allowed: fused_linear, "
                                      "compute_dtype")
        self.num_heads, self.head_size = num_heads, head_size
        self.num_kv_heads = num_kv_heads or num_heads
        self.softmax_scale = softmax_scale if softmax_scale else head_size ** -0.5
        self.causal, self.prefix = causal, prefix
        self.topk_ratio, self.feature_map = float(topk_ratio), feature_map
        self.BLKQ, self.BLKK = BLKQ, BLKK
        self.dtype = compute_dtype or (torch.bfloat16 if use_bf16 else torch.float16)
        self.fused_linear = bool(fused_linear)
        self.proj_l = nn.Linear(head_size, head_size, dtype=torch.float32)
        with torch.no_grad():  # zero: a fresh layer adds nothing to the sparse branch
            nn.init.zeros_(self.proj_l.weight)
            nn.init.zeros_(self.proj_l.bias)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        for name, param in (("weight", self.proj_l.weight), ("bias", self.proj_l.bias)):
            saved = state_dict.get(f"{prefix}proj_l.{name}")
            if saved is not None and tuple(saved.shape) != tuple(param.shape):
                raise CheckpointShapeError(
                    f"{prefix}proj_l.{name} has shape {tuple(saved.shape)} in the checkpoint; "
                    f"allowed: {tuple(param.shape)} (head_size={self.head_size})")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        from attnrt.kernels.block_sparse import block_sparse_attention

        check_qkv(METHOD, self.head_size, query, key, value)
        ratio = step_ratio(self.topk_ratio, attn_metadata)
        index, count, _ = select_blocks(query, key, ratio, self.BLKQ, self.BLKK)
        q, k, v = (t.to(self.dtype) for t in (query, key, value))
        o_s = cast(torch.Tensor, block_sparse_attention(  # return_lse=False: one tensor
            q, k, v, index, count, block_q=self.BLKQ, block_k=self.BLKK,
            softmax_scale=self.softmax_scale))
        o_l = self.linear_branch(query, key, value, index, count)
        out = o_s.to(o_l.dtype) + self.project(o_l).to(o_l.dtype)
        return out.to(query.dtype)

    def linear_branch(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      index: torch.Tensor | None = None,
                      count: torch.Tensor | None = None) -> torch.Tensor:
        """phi(Q)(phi(K)^T V)/(phi(Q) . sum phi(K)) [B, N, H, D] over every key or
        (fused_linear, given the lists) over the unvisited key blocks. With a bf16 compute
        dtype the features are bf16 and the unfused branch multiplies and returns bf16 (as
        upstream); otherwise float32 (fp16 sums over long sequences would overflow), float64
        for float64 inputs."""
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        feat = torch.bfloat16 if self.dtype == torch.bfloat16 else acc
        phi = FEATURE_MAPS[self.feature_map]
        qf, kf = phi(query.to(feat)), phi(key.to(feat))
        if self.fused_linear and index is not None and count is not None:
            return unvisited_linear_attention(qf, kf, value, index, count, self.BLKQ, self.BLKK)
        return linear_attention(qf, kf, value)

    def project(self, o_l: torch.Tensor) -> torch.Tensor:
        """proj_l(o_l) in float32, or in bf16 for a bf16 compute dtype (upstream's autocast)."""
        weight, bias = self.proj_l.weight, self.proj_l.bias
        if self.dtype == torch.bfloat16:
            return F.linear(o_l.to(self.dtype), weight.to(self.dtype), bias.to(self.dtype))
        return self.proj_l(o_l.to(weight.dtype))
