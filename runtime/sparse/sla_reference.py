"""The published SLA algorithm in plain float64 PyTorch with dense [N, M] masks: the documented
meaning of `attnrt.sparse.sla.SLAAttentionImpl`, written without its helpers (no pooling
kernel, no block lists, no kernelised linear attention). Slow; for tests and reading.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size.
"""

from __future__ import annotations

import math

import torch


def phi(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    if feature_map == "softmax":
        e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
        return e / e.sum(dim=-1, keepdim=True)
    if feature_map == "elu":
        return torch.where(x > 0, x + 1, torch.exp(x))  # elu(x) + 1
    return x.clamp_min(0)  # relu


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """[N, D] -> [ceil(N / block), D], block by block."""
    return torch.stack([x[s:s + block].mean(0) for s in range(0, x.shape[0], block)])


def selection_mask(q: torch.Tensor, k: torch.Tensor, topk_ratio: float, block_q: int,
                   block_k: int) -> torch.Tensor:
    """q [N, D], k [M, D] of one head -> bool [NQB, NKB]: the top min(NKB, int(ratio * NKB))
    key blocks of each query block by pooled score (k centred over the sequence first)."""
    pq = block_means(q, block_q)
    pk = block_means(k - k.mean(0), block_k)
    scores = pq @ pk.T
    nkb = scores.shape[1]
    topk = min(nkb, int(topk_ratio * nkb))
    order = torch.argsort(scores, dim=1, descending=True)[:, :topk]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(scores.shape[0]):
        mask[i, order[i]] = True
    return mask


def sla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                  proj_bias: torch.Tensor, topk_ratio: float, feature_map: str = "softmax",
                  block_q: int = 128, block_k: int = 64, scale: float | None = None,
                  unvisited_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, N, H, D], k/v [B, M, Hkv, D] -> (out [B, N, H, D] float64, block mask bool
    [B, H, NQB, NKB]).

    out = softmax(q k^T * scale, over the selected blocks) v
          + proj(S v / (S.sum(-1) + 1e-5)), S = phi(q) phi(k)^T (over the unselected blocks
          only when unvisited_only), proj(x) = x W^T + b.
    """
    q, k, v = q.double(), k.double(), v.double()
    w, bias = proj_weight.double(), proj_bias.double()
    b, n, h, d = q.shape
    m, group = k.shape[1], h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, n, h, d, dtype=torch.float64)
    masks = []
    for bi in range(b):
        for hi in range(h):
            qh, kh, vh = q[bi, :, hi], k[bi, :, hi // group], v[bi, :, hi // group]
            blocks = selection_mask(qh, kh, topk_ratio, block_q, block_k)
            masks.append(blocks)
            keep = blocks.repeat_interleave(block_q, 0)[:n].repeat_interleave(block_k, 1)[:, :m]
            s = (qh @ kh.T * scale).masked_fill(~keep, float("-inf"))
            o_s = torch.softmax(s, dim=-1) @ vh
            lin = phi(qh, feature_map) @ phi(kh, feature_map).T
            if unvisited_only:
                lin = lin * (~keep)
            o_l = (lin @ vh) / (lin.sum(-1, keepdim=True) + 1e-5)
            out[bi, :, hi] = o_s + o_l @ w.T + bias
    mask = torch.stack(masks).view(b, h, *masks[0].shape)
    return out, mask
