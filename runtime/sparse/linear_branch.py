"""SLA's linear-attention branch: phi(Q) (phi(K)^T V) / (phi(Q) . sum phi(K)).

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads (H % Hkv ==
0), D head size, NQB / NKB query / key blocks, MAXK the length of each block list.

Two variants:
- `linear_attention`: over every key, as the released SLA code and FastVideo compute it.
- `unvisited_linear_attention`: over only the key blocks the sparse branch did not visit (the
  paper's formulation). It subtracts each query block's visited blocks from the totals:
  numerator phi(Q_i)(sum_all - sum_visited) phi(K_j)^T V_j, likewise the denominator, so the
  visited part is sum over visited j of (phi(Q_i) phi(K_j)^T) V_j: block-sparse work without a
  softmax. On CUDA with Triton that part runs in one kernel (attnrt.sparse.linear_kernel);
  elsewhere in PyTorch, chunked over query blocks.

Both return float32 (float64 for float64 features; linear_attention bf16 for bf16 features,
as upstream computes the branch); the denominator gets +1e-5 as
upstream's does, so an all-zero relu row gives 0 rather than NaN. The unvisited variant loses
precision as the visited share grows (a difference of two sums): a block that visits every key
block gets exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812

EPS = 1e-5


def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def _softmax_d(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": _softmax_d,  # softmax over the head dim
    "elu": _elu1,  # elu(x) + 1
    "relu": F.relu,
}


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _totals(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Over every key: (qf (kf^T v) [B, N, H, D], qf . kf.sum(seq) [B, N, H]). bf16 features
    multiply in bf16 (float32 accumulation inside the matmul, as upstream's bf16 branch) and
    give bf16; any other dtype float32 (fp16 sums over long sequences overflow), float64 for
    float64."""
    acc = _acc(qf)
    mm = torch.bfloat16 if qf.dtype == torch.bfloat16 else acc
    group = qf.shape[2] // kf.shape[2]
    kv = torch.einsum("bmhd,bmhe->bhde", kf.to(mm), v.to(mm)).repeat_interleave(group, 1)
    ksum = kf.sum(1, dtype=acc).repeat_interleave(group, 1)  # [B, H, D]
    num = torch.einsum("bnhd,bhde->bnhe", qf.to(mm), kv)
    den = torch.einsum("bnhd,bhd->bnh", qf.to(mm), ksum.to(mm))
    return num, den


def linear_attention(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """qf = phi(Q) [B, N, H, D], kf = phi(K) [B, M, Hkv, D], v [B, M, Hkv, D] -> [B, N, H, D]
    in bf16 for bf16 features, else float32 (float64 for float64 features).

    Equivalent PyTorch: (qf @ (kf^T v)) / (qf . kf.sum(seq) + 1e-5) per head.
    """
    num, den = _totals(qf, kf, v)
    return num / (den + EPS)[..., None]


def unvisited_linear_attention(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor,
                               block_index: torch.Tensor, block_count: torch.Tensor,
                               block_q: int, block_k: int) -> torch.Tensor:
    """Linear attention of each query block over the key blocks its list does NOT name.

    qf [B, N, H, D], kf [B, M, Hkv, D], v [B, M, Hkv, D], block_index int32 [B, H, NQB, MAXK],
    block_count int32 [B, H, NQB] -> [B, N, H, D] float32 (float64 for float64 features). The
    visited part multiplies in the features' dtype on CUDA (bf16: tensor cores).
    Equivalent PyTorch: with S = qf kf^T masked to the unvisited key blocks,
    (S v) / (S.sum(-1) + 1e-5).
    """
    num, den = (t.to(_acc(qf)) for t in _totals(qf, kf, v))
    vis_num, vis_den = visited_linear(qf, kf, v.to(qf.dtype), block_index, block_count,
                                      block_q, block_k)
    out = (num - vis_num) / (den - vis_den + EPS)[..., None]
    # A query block that visits every key block has no linear part: exactly 0, not the
    # rounding left by the subtraction divided by EPS.
    nkb = -(-kf.shape[1] // block_k)
    everything = (block_count >= nkb).repeat_interleave(block_q, dim=2)[:, :, :qf.shape[1]]
    return out.masked_fill(everything.transpose(1, 2)[..., None], 0.0)


def visited_linear(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor,
                   block_index: torch.Tensor, block_count: torch.Tensor, block_q: int,
                   block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over visited j of (qf_i kf_j^T) v_j [B, N, H, D], sum of qf_i kf_j^T 1 [B, N, H]),
    float32 (float64 on the PyTorch path for float64 inputs): on CUDA the Triton kernel, else
    chunked PyTorch (both differentiable)."""
    if qf.is_cuda:
        from .linear_kernel import visited_linear_triton  # Triton: imported only on CUDA

        return visited_linear_triton(qf, kf, v, block_index, block_count, block_q, block_k)
    acc = _acc(qf)
    return visited_linear_torch(qf.to(acc), kf.to(acc), v.to(acc), block_index, block_count,
                                block_q, block_k)


def _block_sums(kf: torch.Tensor, v: torch.Tensor, block_k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block: (kf_j^T v_j [B, Hkv, NKB, D, D], kf_j^T 1 [B, Hkv, NKB, D]); the tail
    block sums only the tokens it has."""
    b, m, hkv, d = kf.shape
    nkb = -(-m // block_k)
    pad = nkb * block_k - m
    kp = F.pad(kf, (0, 0, 0, 0, 0, pad)).view(b, nkb, block_k, hkv, d)
    vp = F.pad(v, (0, 0, 0, 0, 0, pad)).view(b, nkb, block_k, hkv, v.shape[-1])
    return torch.einsum("bjthd,bjthe->bhjde", kp, vp), kp.sum(2).transpose(1, 2)


def visited_linear_torch(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor,
                         block_index: torch.Tensor, block_count: torch.Tensor, block_q: int,
                         block_k: int, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch `visited_linear`: gathers the visited blocks' kf^T v sums per query block, `chunk`
    query blocks at a time (memory B * H * chunk * MAXK * D * D)."""
    b, n, h, d = qf.shape
    group = h // kf.shape[2]
    kv_blocks, k_blocks = _block_sums(kf, v, block_k)
    kv_blocks = kv_blocks.repeat_interleave(group, 1)  # [B, H, NKB, D, D]
    k_blocks = k_blocks.repeat_interleave(group, 1)  # [B, H, NKB, D]
    maxk = block_index.shape[-1]
    used = (torch.arange(maxk, device=qf.device) < block_count[..., None]).to(qf.dtype)
    idx = block_index.long()
    nqb = idx.shape[2]
    outs, dens = [], []
    for start in range(0, nqb, chunk):
        sl = slice(start, min(start + chunk, nqb))
        ids, w = idx[:, :, sl], used[:, :, sl]  # [B, H, C, MAXK]
        flat = ids.reshape(b, h, -1)
        kv = torch.gather(kv_blocks, 2, flat[..., None, None].expand(-1, -1, -1, d, d))
        kv = (kv.view(*ids.shape, d, d) * w[..., None, None]).sum(3)  # [B, H, C, D, D]
        ks = torch.gather(k_blocks, 2, flat[..., None].expand(-1, -1, -1, d))
        ks = (ks.view(*ids.shape, d) * w[..., None]).sum(3)  # [B, H, C, D]
        rows = qf[:, sl.start * block_q:min(sl.stop * block_q, n)]
        pad = (sl.stop - sl.start) * block_q - rows.shape[1]
        qb = F.pad(rows, (0, 0, 0, 0, 0, pad)).view(b, -1, block_q, h, d)
        outs.append(torch.einsum("bcthd,bhcde->bcthe", qb, kv).reshape(b, -1, h, d))
        dens.append(torch.einsum("bcthd,bhcd->bcth", qb, ks).reshape(b, -1, h))
    return torch.cat(outs, 1)[:, :n], torch.cat(dens, 1)[:, :n]
