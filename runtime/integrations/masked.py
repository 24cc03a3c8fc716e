"""Attention with an explicit mask, for the integrations: which attnrt backends can take one.

Shapes: B batch, N query sequence, M key sequence, H query heads, Hkv kv heads, D head size.
q [B, N, H, D]; k, v [B, M, Hkv, D]; mask broadcastable to [B, H, N, M], either bool (True:
attend) or additive (same floating dtype family as the scores), as torch's
scaled_dot_product_attention takes it.

attnrt's backends take no mask (their contract is q, k, v and a causal flag), so a masked call is
served by the backends listed in MASKED_KERNELS, chosen through attnrt's selection with that list
as the layer's allow-list: the manifest's ranking, force_backend() and ATTNRT_BACKEND all apply,
and a forced backend that cannot take a mask is an error, never a silent swap.
TODO(integrator): delete this table once AttentionBackend declares SUPPORTS_MASK and impls take
a mask; the integrations then pass it through LocalAttention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Pair = tuple[torch.Tensor, torch.Tensor]
CHUNK_BYTES = 64 << 20


def reference_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float | None, return_lse: bool = False,
                     chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor | Pair:
    """Masked attention in pure torch, float32 accumulation (float64 for float64 inputs).

    q [B, N, H, D], k/v [B, M, Hkv, D], mask broadcastable to [B, H, N, M] -> [B, N, H, D]
    (and lse [B, H, N] float32, natural log, with return_lse). A row whose keys are all masked
    out gives zeros (lse -inf), as torch's SDPA gives on its math path since 2.5. Query rows
    are processed in chunks whose scores take at most `chunk_bytes`.

    Equivalent PyTorch:
        s = q.transpose(1, 2) @ k.transpose(1, 2).mT * scale      (kv heads repeated)
        s = s.masked_fill(~mask, -inf) if mask is bool else s + mask
        out = (s.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.to(acc).transpose(1, 2) for t in (q, k, v))
    if group > 1:
        kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    b, h, n, m = qt.shape[0], qt.shape[1], qt.shape[2], kt.shape[2]
    mask = mask.expand(*torch.broadcast_shapes(mask.shape, (1, 1, n, m))[:-2], n, m)
    rows = max(1, chunk_bytes // max(1, b * h * m * torch.finfo(acc).bits // 8))
    outs, lses = [], []
    for start in range(0, n, rows):
        s = qt[:, :, start:start + rows] @ kt.mT * scale
        part = mask[..., start:start + rows, :]
        s = s.masked_fill(~part, float("-inf")) if mask.dtype == torch.bool else s + part.to(acc)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(nan=0.0)  # all-masked rows: 0
        outs.append(p @ vt)
        lses.append(lse)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return (out, torch.cat(lses, dim=2).float()) if return_lse else out


def sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                scale: float | None, return_lse: bool = False) -> torch.Tensor | Pair:
    """torch's SDPA with attn_mask on [B, N, H, D] tensors (GQA through enable_gqa).

    Equivalent PyTorch: reference_masked(q, k, v, mask, scale). No lse (the public SDPA
    returns none): MASKED_KERNELS declares it, so calls asking for lse never select it.
    """
    if return_lse:
        raise ValueError("return_lse=True is not supported by sdpa_masked; allowed: False")
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale,
                                         enable_gqa=qt.shape[1] != kt.shape[1])
    return out.transpose(1, 2)


@dataclass(frozen=True)
class MaskedKernel:
    """A backend's masked path: the function, and whether it can also return lse."""

    run: Callable[..., torch.Tensor | Pair]
    lse: bool


MASKED_KERNELS: dict[str, MaskedKernel] = {
    "TORCH_SDPA": MaskedKernel(sdpa_masked, lse=False),
    "REFERENCE": MaskedKernel(reference_masked, lse=True),
}


def masked_names(need_lse: bool) -> tuple[str, ...]:
    """Backend names that can serve a masked call (and return lse where `need_lse`)."""
    return tuple(n for n, k in MASKED_KERNELS.items() if k.lse or not need_lse)


def causal_top_left(n: int, m: int, device: torch.device) -> torch.Tensor:
    """torch SDPA's is_causal mask, [N, M] bool: query i sees keys j <= i (top-left aligned;
    attnrt's own causal is bottom-right aligned, and the two agree only where N == M)."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril()
