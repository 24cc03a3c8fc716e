"""Hardening (issue 18): REFERENCE, the ground truth, keeps NaN and inf where they belong.

For causal N > M, rows i < N - M see no key and output zeros; before the fix a nan_to_num over
the whole probability matrix also zeroed rows whose inputs held NaN, hiding them.
"""

from __future__ import annotations

import pytest
import torch

from attnrt.backends.reference import chunked_attention
from tests.helpers import dense_reference, randn_qkv


@pytest.mark.parametrize("poison", ["q", "k", "v"])
def test_causal_longer_queries_keep_a_nan_input_visible(poison: str) -> None:
    q, k, v = randn_qkv(1, 6, 2, 8, m=3, dtype=torch.float64, seed=5)
    {"q": q, "k": k, "v": v}[poison][0, -1, 0, 0] = float("nan")
    out = chunked_attention(q, k, v, causal=True)
    assert torch.isnan(out[0, -1, 0]).any()  # the last row sees the last key and query
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))  # rows that see no key
    assert torch.isfinite(out[0, :, 1]).all()  # the other head never meets the NaN


def test_causal_longer_queries_keep_an_inf_input_as_nan() -> None:
    q, k, v = randn_qkv(1, 5, 1, 8, m=2, dtype=torch.float64, seed=6)
    q[0, 4, 0, 0] = float("inf")
    out = chunked_attention(q, k, v, causal=True)
    assert not torch.isfinite(out[0, 4]).all()


def test_causal_longer_queries_match_the_dense_reference_on_finite_inputs() -> None:
    q, k, v = randn_qkv(2, 7, 4, 8, hkv=2, m=3, dtype=torch.float64, seed=8)
    out, lse = chunked_attention(q, k, v, causal=True, return_lse=True)
    assert torch.allclose(out, dense_reference(q, k, v, causal=True), atol=1e-12)
    assert torch.isneginf(lse[:, :, :4]).all()
    assert torch.isfinite(lse[:, :, 4:]).all()
