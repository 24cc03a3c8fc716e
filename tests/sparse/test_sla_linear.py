"""SLA's linear branch: the visited-blocks kernel (Triton, interpreter on CPU) and its PyTorch
twin against a dense float64 formulation; values and gradients, ragged lists, GQA, tails."""

from __future__ import annotations

import pytest
import torch

from attnrt.sparse.linear_branch import (
    linear_attention,
    unvisited_linear_attention,
    visited_linear_torch,
)
from tests.conftest import rel_l2


def inputs(n: int, m: int, h: int, hkv: int, d: int, block_q: int, block_k: int, seed: int,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(1, n, h, d, generator=gen).to(dtype)  # features are non-negative
    b = torch.rand(1, m, hkv, d, generator=gen).to(dtype)
    v = torch.randn(1, m, hkv, d, generator=gen).to(dtype)
    nqb, nkb = -(-n // block_q), -(-m // block_k)
    index = torch.stack([torch.randperm(nkb, generator=gen) for _ in range(h * nqb)])
    count = torch.randint(0, nkb + 1, (1, h, nqb), generator=gen, dtype=torch.int32)
    return a, b, v, index.view(1, h, nqb, nkb).to(torch.int32), count


def dense_visited(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                  count: torch.Tensor, block_q: int, block_k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64: S = a b^T masked to the listed blocks; (S v, S 1)."""
    a, b, v = a.double(), b.double(), v.double()
    n, h, m = a.shape[1], a.shape[2], b.shape[1]
    group = h // b.shape[2]
    num = torch.zeros(1, n, h, a.shape[3], dtype=torch.float64)
    den = torch.zeros(1, n, h, dtype=torch.float64)
    for hi in range(h):
        keep = torch.zeros(n, m, dtype=torch.bool)
        for qb in range(index.shape[2]):
            for j in index[0, hi, qb, :int(count[0, hi, qb])].tolist():
                keep[qb * block_q:(qb + 1) * block_q, j * block_k:(j + 1) * block_k] = True
        s = (a[0, :, hi] @ b[0, :, hi // group].T) * keep
        num[0, :, hi] = s @ v[0, :, hi // group]
        den[0, :, hi] = s.sum(-1)
    return num, den


@pytest.mark.parametrize(("n", "m", "d"), [(70, 90, 16), (64, 64, 32), (40, 50, 24)])
def test_triton_kernel_values_and_grads(n: int, m: int, d: int) -> None:
    from attnrt.sparse.linear_kernel import visited_linear_triton

    a, b, v, index, count = inputs(n, m, 4, 2, d, 32, 16, seed=n + d)
    a, b, v = (t.requires_grad_() for t in (a, b, v))
    num, den = visited_linear_triton(a, b, v, index, count, 32, 16)
    a64, b64, v64 = (t.detach().double().requires_grad_() for t in (a, b, v))
    want_num, want_den = dense_visited(a64, b64, v64, index, count, 32, 16)
    assert rel_l2(num, want_num) < 1e-5
    assert rel_l2(den, want_den) < 1e-5
    gen = torch.Generator().manual_seed(1)
    g_num, g_den = torch.randn(num.shape, generator=gen), torch.randn(den.shape, generator=gen)
    (num * g_num).sum().add((den * g_den).sum()).backward()
    (want_num * g_num.double()).sum().add((want_den * g_den.double()).sum()).backward()
    for got, want in ((a.grad, a64.grad), (b.grad, b64.grad), (v.grad, v64.grad)):
        assert rel_l2(got, want) < 1e-5


def test_triton_kernel_fp16() -> None:
    from attnrt.sparse.linear_kernel import visited_linear_triton

    a, b, v, index, count = inputs(64, 80, 2, 2, 32, 32, 16, seed=3, dtype=torch.float16)
    num, den = visited_linear_triton(a, b, v, index, count, 32, 16)
    want_num, want_den = dense_visited(a, b, v, index, count, 32, 16)
    assert num.dtype == torch.float32
    assert rel_l2(num, want_num) < 3e-3
    assert rel_l2(den, want_den) < 3e-3


def test_torch_path_matches_dense() -> None:
    a, b, v, index, count = inputs(70, 90, 4, 2, 16, 32, 16, seed=4)
    num, den = visited_linear_torch(a.double(), b.double(), v.double(), index, count, 32, 16,
                                    chunk=2)
    want_num, want_den = dense_visited(a, b, v, index, count, 32, 16)
    assert rel_l2(num, want_num) < 1e-12
    assert rel_l2(den, want_den) < 1e-12


def test_unvisited_is_total_minus_visited() -> None:
    a, b, v, index, count = inputs(64, 64, 2, 2, 16, 32, 16, seed=5)
    full = count.clone().fill_(0)
    assert rel_l2(unvisited_linear_attention(a, b, v, index, full, 32, 16),
                  linear_attention(a, b, v)) < 1e-6
    num, den = dense_visited(a, b, v, index, count, 32, 16)
    tot_num, tot_den = dense_visited(a, b, v, index, torch.full_like(count, 4), 32, 16)
    want = (tot_num - num) / (tot_den - den + 1e-5)[..., None]
    assert rel_l2(unvisited_linear_attention(a, b, v, index, count, 32, 16), want) < 1e-5
