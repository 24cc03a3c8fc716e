"""VSA's cube pooling: the one-pass Triton kernel (interpreter on CPU) against the torch sum, in
values and gradients, with partial cubes and GQA; VSA with either pool against its reference."""

from __future__ import annotations

import pytest
import torch

from attnrt.sparse import vsa_pool
from tests.conftest import TOLERANCE, rel_l2


def _slots(c: int, h: int, d: int, sizes: torch.Tensor, dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c * 64, h, d, generator=gen).to(dtype)
    keep = torch.arange(64)[None, :] < sizes[:, None]  # padding slots hold zeros, as tiled
    return (x.view(2, c, 64, h, d) * keep[None, :, :, None, None]).view(2, c * 64, h, d)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_pool_matches_torch_in_values_and_gradients(dtype):
    sizes = torch.tensor([64, 17, 40], dtype=torch.int32)
    q = _slots(3, 4, 24, sizes, dtype, 0).requires_grad_()
    k = _slots(3, 2, 24, sizes, dtype, 1).requires_grad_()
    v = _slots(3, 2, 24, sizes, dtype, 2).requires_grad_()
    got = vsa_pool.pool_qkv(q, k, v, sizes, pool="triton")
    want = vsa_pool.pool_qkv(q, k, v, sizes, pool="torch")
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
               for i, t in enumerate(want)]
    grads = []
    for outs in (got, want):
        assert all(t.dtype == torch.float32 for t in outs)
        loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
        grads.append(torch.autograd.grad(loss, (q, k, v)))
    for a, b in zip(got, want, strict=True):
        assert rel_l2(a, b) < 1e-6
    for a, b in zip(*grads, strict=True):
        assert a.dtype == dtype
        assert rel_l2(a, b) < TOLERANCE[dtype]


@pytest.mark.interpret
def test_pool_mean_divides_by_the_valid_count():
    sizes = torch.tensor([3, 64], dtype=torch.int32)
    x = torch.zeros(1, 128, 1, 16)
    x[0, :3] = 2.0
    x[0, 64:] = 1.0
    qc, _, _ = vsa_pool.pool_qkv(x, x, x, sizes, pool="triton")
    assert torch.equal(qc[0, :, 0, 0], torch.tensor([2.0, 1.0]))
