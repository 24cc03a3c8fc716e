"""VMoBA's pair scatter: the Triton kernels (interpreter on CPU) against the PyTorch path,
values and both gradients, with padding rows (share 0) and repeated tokens."""

from __future__ import annotations

import pytest
import torch

from attnrt.sparse.pair_scatter import _torch_backward, _torch_forward, weighted_scatter
from tests.conftest import rel_l2


def pairs(dtype: torch.dtype, d: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(d)
    out = torch.randn(2, 70, 3, d, generator=gen).to(dtype)
    share = torch.rand(2, 3, 70, generator=gen)
    share[:, :, 60:] = 0.0  # padding rows
    token = torch.randint(0, 20, (2, 3, 70), generator=gen)
    return out, share, token


@pytest.mark.parametrize(("dtype", "d"), [(torch.float32, 32), (torch.float16, 24)])
def test_kernel_matches_torch(dtype: torch.dtype, d: int) -> None:
    from attnrt.sparse.pair_scatter_kernel import scatter_backward, scatter_forward

    out, share, token = pairs(dtype, d)
    want = _torch_forward(out.double(), share.double(), token, 20)
    got = scatter_forward(out, share, token, 20)
    assert got.dtype == torch.float32
    assert rel_l2(got, want) < (1e-6 if dtype == torch.float32 else 1e-3)
    grad = torch.randn(2, 20, 3, d, generator=torch.Generator().manual_seed(1))
    want_out, want_share = _torch_backward(grad.double(), out.double(), share.double(), token)
    got_out, got_share = scatter_backward(grad, out, share, token)
    assert got_out.dtype == dtype
    assert rel_l2(got_out, want_out) < (1e-6 if dtype == torch.float32 else 1e-3)
    assert rel_l2(got_share, want_share) < (1e-6 if dtype == torch.float32 else 1e-3)


def test_function_gradients_by_finite_differences() -> None:
    out, share, token = pairs(torch.float64, 8)
    out.requires_grad_()
    share64 = share.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda o, s: weighted_scatter(o, s, token, 20),
                                    (out, share64))
