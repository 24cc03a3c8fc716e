"""Pure-PyTorch meaning of VSA (float64-capable), on video tokens in grid order.

Shapes: B batch, N = T * H * W tokens in row-major (t, h, w) order, C cubes, H query heads, Hkv
key/value heads, D head size. Written from the published algorithm, independently of the tiled
fast path: cubes come from each token's coordinates, pooling is a one-hot matrix product, and
the fine stage is dense attention under the per-token mask the cube selection implies.
Materialises [B, H, N, N]; for tests and reading only.
"""

from __future__ import annotations

import math

import torch

from ..kernels.block_sparse.reference import masked_attention
from .vsa_layout import cube_of_tokens
from .vsa_metadata import cur_topk


def vsa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate_compress: torch.Tensor,
                  dit_seq_shape: tuple[int, int, int], sparsity: float,
                  softmax_scale: float | None = None) -> torch.Tensor:
    """VSA over q, gate_compress [B, N, H, D] and k, v [B, N, Hkv, D] of the latent grid
    dit_seq_shape = (T, H, W). Returns [B, N, H, D] in q's dtype (computed in float64 for float64
    inputs, else float32). Differentiable in every tensor argument.

    Equivalent PyTorch: this function; `attnrt.sparse.vsa.video_sparse_attention` computes the
    same on the tiled layout with the block-sparse kernel.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    cube = cube_of_tokens(dit_seq_shape).to(q.device)
    n_cubes = int(cube.max()) + 1
    onehot = torch.nn.functional.one_hot(cube, n_cubes).to(acc)  # [N, C]
    members = onehot / onehot.sum(0)  # column c averages cube c's tokens
    group = q.shape[2] // k.shape[2]
    qf = q.to(acc)
    kf, vf = (t.to(acc).repeat_interleave(group, dim=2) for t in (k, v))
    qc, kc, vc = (torch.einsum("nc,bnhd->bhcd", members, t) for t in (qf, kf, vf))
    scores = torch.einsum("bhcd,bhed->bhce", qc, kc) * scale
    coarse = torch.einsum("bhce,bhed->bhcd", torch.softmax(scores, -1), vc)
    coarse_tokens = coarse[:, :, cube].transpose(1, 2)  # [B, N, H, D]: each token's cube
    keep_cubes = torch.zeros_like(scores, dtype=torch.bool)
    keep_cubes.scatter_(-1, scores.topk(cur_topk(sparsity, n_cubes), dim=-1).indices, True)
    keep = keep_cubes[:, :, cube][:, :, :, cube]  # [B, H, N, N]
    fine, _ = masked_attention(qf, kf, vf, keep, scale)
    return (coarse_tokens * gate_compress.to(acc) + fine).to(q.dtype)
