"""The ground truth of linear attention: the token-by-token recurrence, in pure PyTorch.

Shapes: B batch, N sequence, H heads, Dk query/key head size, Dv value head size.
q, k [B, N, H, Dk]; v [B, N, H, Dv]; state [B, H, Dk, Dv].

Decay convention (AttentionEngine's): `g` is the natural-log decay, g <= 0, applied as the
factor exp(g) in (0, 1] to the state before each token is added:

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = q_t S_t          (causal)

g may be None (no decay: factor 1), [B, N, H] (one factor per head and token: RetNet when it is
constant, Mamba-2 / simple GLA when data-dependent) or [B, N, H, Dk] (one factor per head, token
and key channel: GLA's gates, decaying the rows of S). Non-causal: o_t = q_t (S_0 + sum_s
k_s^T v_s) for every t, without decay (a decay needs a token order). No normalizer is applied.

Accumulation is float32 (float64 for float64 inputs); every function is differentiable.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and sums are kept in for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          g: torch.Tensor | None, state: torch.Tensor,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: q, k [B, H, Dk], v [B, H, Dv], g None | [B, H] | [B, H, Dk] (log),
    state [B, H, Dk, Dv] -> (o [B, H, Dv] in q's dtype, new state in state's dtype).

    Equivalent PyTorch:
        state = exp(g)[..., None] * state + k[..., :, None] * v[..., None, :]
        o = (q[..., None] * state).sum(-2)
    """
    acc = state.dtype
    if g is not None:
        factor = torch.exp(g.to(acc))
        state = state * (factor[..., None, None] if factor.dim() == 2 else factor[..., None])
    state = state + k.to(acc)[..., :, None] * v.to(acc)[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.to(acc), state)
    return o.to(q.dtype), state


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               g: torch.Tensor | None = None, *, causal: bool = True,
                               initial_state: torch.Tensor | None = None,
                               output_final_state: bool = False,
                               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention by the recurrence: q, k [B, N, H, Dk], v [B, N, H, Dv], g None |
    [B, N, H] | [B, N, H, Dk] (natural-log decay, <= 0), initial_state [B, H, Dk, Dv] or None
    -> (o [B, N, H, Dv] in q's dtype, final state [B, H, Dk, Dv] float32/float64 or None).

    Equivalent PyTorch (causal): for t in range(N): S = exp(g_t) * S + k_t^T v_t; o_t = q_t S.
    """
    b, _, h, dk = q.shape
    acc = accumulation_dtype(q.dtype)
    state = (torch.zeros(b, h, dk, v.shape[-1], dtype=acc, device=q.device)
             if initial_state is None else initial_state.to(acc))
    if not causal:
        state = state + torch.einsum("bnhk,bnhv->bhkv", k.to(acc), v.to(acc))
        o = torch.einsum("bnhk,bhkv->bnhv", q.to(acc), state).to(q.dtype)
        return o, (state if output_final_state else None)
    outs = []
    for t in range(q.shape[1]):
        gt = None if g is None else g[:, t]
        o_t, state = linear_attention_step(q[:, t], k[:, t], v[:, t], gt, state)
        outs.append(o_t)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(b, 0, h, v.shape[-1])
    return o, (state if output_final_state else None)
