"""The recurrent reference is the ground truth: check it against an independent closed form.

Closed form (float64, small N): o_t = sum_{s <= t} (q_t * exp(G_t - G_s)) . k_s v_s
+ (q_t * exp(G_t)) S_0, G the global cumulative log-decay.
"""

from __future__ import annotations

import pytest
import torch

from attnrt.kernels.linear.reference import linear_attention_reference, linear_attention_step


def closed_form(q, k, v, g, h0):
    b, n, h, dk = q.shape
    if g is None:
        g = torch.zeros(b, n, h, dk, dtype=q.dtype)
    elif g.dim() == 3:
        g = g[..., None].expand(b, n, h, dk)
    big_g = g.cumsum(1)  # [B, N, H, Dk]
    diff = big_g[:, :, None] - big_g[:, None, :]  # [B, t, s, H, Dk]
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, :, :, None, None]
    weight = torch.where(mask, diff, float("-inf")).exp()
    scores = torch.einsum("bthk,bshk,btshk->bths", q, k, weight)
    o = torch.einsum("bths,bshv->bthv", scores, v)
    o = o + torch.einsum("bthk,bhkv->bthv", q * big_g.exp(), h0)
    final = big_g[:, -1].exp()[..., None] * h0 + torch.einsum(
        "bshk,bshv->bhkv", k * (big_g[:, -1:] - big_g).exp(), v)
    return o, final


@pytest.mark.parametrize("decay", ["none", "token", "channel"])
def test_recurrence_matches_closed_form(decay: str) -> None:
    gen = torch.Generator().manual_seed(1)
    b, n, h, dk, dv = 2, 9, 3, 4, 5
    q, k, v = (torch.randn(b, n, h, d, generator=gen, dtype=torch.float64)
               for d in (dk, dk, dv))
    g = {"none": None, "token": -torch.rand(b, n, h, generator=gen, dtype=torch.float64),
         "channel": -torch.rand(b, n, h, dk, generator=gen, dtype=torch.float64)}[decay]
    h0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    o, final = linear_attention_reference(q, k, v, g, initial_state=h0, output_final_state=True)
    want_o, want_final = closed_form(q, k, v, g, h0)
    torch.testing.assert_close(o, want_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, want_final, rtol=1e-12, atol=1e-12)


def test_non_causal_is_every_token_against_all() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 7, 2, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    o, final = linear_attention_reference(q, k, v, causal=False, output_final_state=True)
    scores = torch.einsum("bthk,bshk->bths", q, k)
    torch.testing.assert_close(o, torch.einsum("bths,bshv->bthv", scores, v))
    torch.testing.assert_close(final, torch.einsum("bshk,bshv->bhkv", k, v))


def test_step_is_one_token_of_the_recurrence() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 1, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    g = -torch.rand(2, 1, 2, 4, generator=gen, dtype=torch.float64)
    h0 = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    o, state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], h0)
    want_o, want_state = linear_attention_reference(q, k, v, g, initial_state=h0,
                                                    output_final_state=True)
    torch.testing.assert_close(o, want_o[:, 0])
    torch.testing.assert_close(state, want_state)
