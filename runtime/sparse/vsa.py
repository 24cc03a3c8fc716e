"""Video Sparse Attention (VSA, Zhang et al. 2025) on the tiled layout: a coarse stage over
64-token cubes picks, per query cube, the key cubes the fine stage attends exactly.

Shapes: B batch, S = 64 * C slots of the tiled layout (attnrt.sparse.vsa_layout; padding slots
hold zeros), C cubes, H query heads, Hkv key/value heads (H % Hkv == 0), D head size; tensors
[B, S, H, D]. The published algorithm, as FastVideo computes it:

    q_c, k_c, v_c = mean of each cube's valid tokens                     [B, C, H|Hkv, D]
    scores = q_c k_c^T * scale; coarse = softmax(scores) v_c             per query cube
    keep the top ceil((1 - sparsity) * C) key cubes of each query cube's scores
    fine = exact attention of each query over the valid tokens of its kept key cubes
    out = coarse (broadcast to the cube's tokens) * gate_compress + fine

The fine stage is attnrt's block-sparse flash kernel (64-token blocks, per-cube valid counts);
vsa_with_fine_stage takes another (CUDNN_BSA_VSA hands it to cuDNN's block-sparse attention).
Equivalent PyTorch (float64, on tokens in grid order): attnrt.sparse.vsa_reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F

from ..kernels.block_sparse import block_sparse_attention
from ..kernels.block_sparse.checks import check_kernel_tensors
from .vsa_layout import CUBE_TOKENS
from .vsa_metadata import VSAInputError, VSATypeError
from .vsa_pool import pool_qkv


def coarse_stage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: torch.Tensor,
                 topk: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(coarse output [B, C, H, D] in q's dtype, kept key cubes int32 [B, H, C, topk]).

    Selection scores are float32 (ties among 16-bit scores would make the choice arbitrary);
    the coarse attention runs in q's dtype through SDPA, differentiable in q, k, v."""
    group = q.shape[2] // k.shape[2]
    qc, kc, vc = (t.transpose(1, 2) for t in pool_qkv(q, k, v, sizes))  # [B, Hx, C, D]
    kc, vc = kc.repeat_interleave(group, 1), vc.repeat_interleave(group, 1)
    with torch.no_grad():
        scores = torch.matmul(qc.detach(), kc.detach().transpose(-1, -2))
        index = scores.topk(topk, dim=-1, sorted=False).indices.to(torch.int32)
    coarse = F.scaled_dot_product_attention(qc.to(q.dtype), kc.to(q.dtype), vc.to(q.dtype),
                                            scale=scale)
    return coarse.transpose(1, 2), index


def check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate_compress: object,
                  n_slots: int) -> None:
    """Every refusal of video_sparse_attention, before any work: the kernel's limits, the
    gate, and the sequence length the layout expects."""
    check_kernel_tensors(q, k, v)
    check_gate_and_length(q, k, gate_compress, n_slots)


def check_gate_and_length(q: torch.Tensor, k: torch.Tensor, gate_compress: object,
                          n_slots: int) -> None:
    """gate_compress shaped like q; q and k of the tiled length (64 slots per cube)."""
    if not isinstance(gate_compress, torch.Tensor):
        raise VSATypeError(f"gate_compress={type(gate_compress).__name__} is not allowed; "
                           "VSA needs a tensor shaped like query [B, S, H, D]")
    gate = gate_compress
    if gate.shape != q.shape or gate.dtype != q.dtype or gate.device != q.device:
        raise VSAInputError(f"gate_compress.shape={tuple(gate.shape)} ({gate.dtype}) is not "
                            f"allowed; it must equal query's {tuple(q.shape)} ({q.dtype}) on "
                            f"{q.device}")
    for name, t in (("query", q), ("key", k)):
        if t.shape[1] != n_slots:
            raise VSAInputError(
                f"{name}.shape[1]={t.shape[1]} is not allowed for this latent shape; expected "
                f"the tiled length {n_slots} (64 slots per cube of "
                f"{n_slots // CUBE_TOKENS}; preprocess_qkv tiles the video tokens)")


# (q [B, S, H, D], k, v [B, S, Hkv, D], kept key cubes int32 [B, H, C, topk], valid tokens per
# cube int32 [C], softmax scale) -> fine output [B, S, H, D]: the swappable stage of VSA.
FineStage = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                     torch.Tensor]


def triton_fine_stage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                      sizes: torch.Tensor, scale: float) -> torch.Tensor:
    """attnrt's block-sparse flash kernel over the kept cubes (64-token blocks both sides)."""
    count = torch.full(index.shape[:3], index.shape[-1], dtype=torch.int32, device=q.device)
    return cast(torch.Tensor, block_sparse_attention(
        q, k, v, index, count, block_q=CUBE_TOKENS, block_k=CUBE_TOKENS, key_block_valid=sizes,
        softmax_scale=scale))


def vsa_with_fine_stage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        gate_compress: torch.Tensor, sizes: torch.Tensor, topk: int,
                        scale: float, fine_stage: FineStage) -> torch.Tensor:
    """VSA on checked tiled tensors (q, gate_compress [B, S, H, D], k, v [B, S, Hkv, D], sizes
    int32 [C]): the coarse stage and selection here, the fine stage by `fine_stage`, then
    coarse * gate_compress + fine. Returns [B, S, H, D]."""
    sizes = sizes.contiguous()  # the pooling and fine-stage kernels read entry c at offset c
    coarse, index = coarse_stage(q, k, v, sizes, topk, scale)
    b, s, h, d = q.shape
    fine = fine_stage(q, k, v, index, sizes, scale)
    c = s // CUBE_TOKENS
    out = torch.addcmul(fine.view(b, c, CUBE_TOKENS, h, d),
                        gate_compress.reshape(b, c, CUBE_TOKENS, h, d), coarse[:, :, None])
    return out.view(b, s, h, d)


def video_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           gate_compress: torch.Tensor, variable_block_sizes: torch.Tensor,
                           topk: int, softmax_scale: float | None = None) -> torch.Tensor:
    """VSA over tiled q [B, S, H, D], k, v [B, S, Hkv, D], gate_compress [B, S, H, D];
    variable_block_sizes int32 [C] valid tokens per cube; topk key cubes per query cube.
    Returns [B, S, H, D] (padding slots hold values the untile step drops). Differentiable in
    q, k, v and gate_compress; softmax_scale (default D^-0.5) scales coarse and fine scores."""
    check_tensors(q, k, v, gate_compress, variable_block_sizes.numel() * CUBE_TOKENS)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    sizes = variable_block_sizes.to(torch.int32)
    return vsa_with_fine_stage(q, k, v, gate_compress, sizes, topk, scale, triton_fine_stage)
