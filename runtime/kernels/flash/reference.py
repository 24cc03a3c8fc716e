"""Pure-PyTorch meaning of `attnrt.kernels.flash.launch.flash_attention`.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size.
This is the documented meaning of the Triton kernel: slow (it materialises the [B, H, N, M] scores)
and only meant for tests and for reading.
"""

from __future__ import annotations

import math

import torch


def causal_keep_mask(n: int, m: int, device: torch.device) -> torch.Tensor:
    """[N, M] bool, True where query i may see key j.

    Causal masks are aligned bottom-right, as in FlashAttention >= 2.1: query i sees key j iff
    j <= i + (M - N). With N > M the first N - M query rows see no key at all.
    """
    rows = torch.arange(n, device=device)[:, None]
    cols = torch.arange(m, device=device)[None, :]
    return cols <= rows + (m - n)


def flash_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over q [B, N, H, D] and k, v [B, M, Hkv, D] (H % Hkv == 0).

    Equivalent to softmax(q k^T * softmax_scale, masked) v per head, with query head h reading
    key/value head h // (H // Hkv). Accumulates in float64 for float64 inputs, else float32;
    returns out [B, N, H, D] in q's dtype, and with return_lse also lse [B, H, N] (natural-log
    log-sum-exp of the scaled, masked scores; -inf, with a zero output row, where a causal row
    sees no key).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    # Repeating K/V is fine here; the kernel maps heads instead of materialising copies.
    kf = k.to(acc).repeat_interleave(group, dim=2)
    vf = v.to(acc).repeat_interleave(group, dim=2)
    scores = torch.einsum("bnhd,bmhd->bhnm", q.to(acc), kf) * scale
    n, m = q.shape[1], k.shape[1]
    if causal:
        keep = causal_keep_mask(n, m, q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
        empty = ~keep.any(dim=-1)  # [N]: rows that see no key (only when N > M)
    else:
        empty = torch.zeros(n, dtype=torch.bool, device=q.device)
    # Empty rows get finite stand-in scores so that neither value nor gradient becomes NaN.
    lse_all = torch.logsumexp(scores.masked_fill(empty[:, None], 0.0), dim=-1)
    probs = torch.exp(scores - lse_all.masked_fill(empty, 0.0)[..., None])
    out = torch.einsum("bhnm,bmhd->bnhd", probs, vf).to(q.dtype)
    if not return_lse:
        return out
    lse = lse_all.masked_fill(empty, float("-inf"))
    return out, lse
