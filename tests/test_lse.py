"""forward_with_lse of every backend that has one, and merge_partials, against float64.

The log-sum-exp is what lets partial attention over disjoint key sets merge exactly (the
local-first schedule of DistributedAttention); each backend's is checked against the dense
float64 logsumexp of the scaled scores, and its output against the dense reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnrt.backends.reference import ReferenceImpl
from attnrt.backends.sdpa import TorchSdpaImpl, sdpa_with_lse
from attnrt.backends.triton_flash import TritonFlashAttnImpl
from attnrt.interfaces import lse_forward, merge_partials
from tests.conftest import TOLERANCE, rel_l2
from tests.helpers import dense_reference, randn_qkv


def dense_lse(q: torch.Tensor, k: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Float64 [B, H, N] natural-log log-sum-exp of the scaled scores (bottom-right causal)."""
    q64, k64 = q.double().cpu(), k.double().cpu()
    k64 = k64.repeat_interleave(q.shape[2] // k.shape[2], 2)
    s = torch.einsum("bnhd,bmhd->bhnm", q64, k64) / math.sqrt(q.shape[-1])
    if causal:
        n, m = q.shape[1], k.shape[1]
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(m - n + 1), float("-inf"))
    return torch.logsumexp(s, dim=-1)


def check_lse_forward(impl: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      causal: bool = False) -> None:
    fn = lse_forward(impl)  # type: ignore[arg-type]
    assert fn is not None
    out, lse = fn(q, k, v, None)
    assert out.shape == q.shape
    assert out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert lse.dtype == torch.float32
    tol = TOLERANCE[q.dtype]
    assert rel_l2(out, dense_reference(q, k, v, causal)) < tol
    # lse values are O(log M + |s|): compare absolutely, at the dtype's input rounding.
    err = (lse.double().cpu() - dense_lse(q, k, causal)).abs().max().item()
    assert err < (1e-4 if q.dtype == torch.float32 else 5e-2), err


def _impl(cls: type, h: int, d: int, hkv: int, causal: bool = False) -> object:
    return cls(h, d, 1.0 / math.sqrt(d), causal, hkv)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("h", "hkv"), [(4, 4), (4, 2), (4, 1)])
def test_reference_lse(h: int, hkv: int, causal: bool) -> None:
    q, k, v = randn_qkv(2, 9, h, 16, hkv=hkv)
    check_lse_forward(_impl(ReferenceImpl, h, 16, hkv, causal), q, k, v, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("h", "hkv", "causal"), [(4, 4, False), (4, 2, False), (2, 2, True)])
def test_torch_sdpa_lse_on_cpu(dtype: torch.dtype, h: int, hkv: int, causal: bool) -> None:
    q, k, v = randn_qkv(2, 33, h, 32, hkv=hkv, dtype=dtype)
    check_lse_forward(_impl(TorchSdpaImpl, h, 32, hkv, causal), q, k, v, causal)


def test_torch_sdpa_lse_with_unequal_lengths() -> None:
    q, k, v = randn_qkv(1, 7, 2, 16, m=20)
    check_lse_forward(_impl(TorchSdpaImpl, 2, 16, 2), q, k, v)


def test_torch_sdpa_lse_refuses_causal_with_unequal_lengths() -> None:
    q, k, v = randn_qkv(1, 7, 2, 16, m=20)
    with pytest.raises(ValueError, match="causal=True with q length 7 != k length 20"):
        sdpa_with_lse(q, k, v, True, None)


def test_triton_flash_lse_under_the_interpreter() -> None:
    q, k, v = randn_qkv(1, 40, 2, 32, hkv=1)
    check_lse_forward(_impl(TritonFlashAttnImpl, 2, 32, 1), q, k, v)


GPU_LSE_CASES = [(name, shape) for name in ("TORCH_SDPA", "TORCH_SDPA_CUDNN", "TORCH_SDPA_FLASH",
                                             "TORCH_SDPA_EFFICIENT", "TRITON_FLASH_ATTN")
                 for shape in ((1000, 1000, 4), (333, 2000, 4), (512, 512, 2))
                 if not (name == "TORCH_SDPA_EFFICIENT" and shape[2] != 4)]  # declares no GQA


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "shape"), GPU_LSE_CASES)
def test_lse_on_the_gpu(name: str, shape: tuple[int, int, int]) -> None:
    from attnrt.selection.registry import load

    n, m, hkv = shape
    q, k, v = (t.cuda() for t in randn_qkv(2, n, 4, 128, hkv=hkv, m=m, dtype=torch.bfloat16))
    impl = load(name).get_impl_cls()(4, 128, 128 ** -0.5, False, hkv)
    check_lse_forward(impl, q, k, v)


@pytest.mark.parametrize("cls", [ReferenceImpl, TorchSdpaImpl, TritonFlashAttnImpl])
def test_lse_on_the_strided_views_local_first_passes(cls: type) -> None:
    """One rank's heads of a shard ([1, S, P, H/P, D] sliced) and keys/values interleaved per
    row ([1, M, 2, Hkv, D] sliced), as DistributedAttention's local-first schedule passes them."""
    q_all = torch.randn(1, 40, 2, 4, 32)
    kv = torch.randn(1, 56, 2, 2, 32)
    q, k, v = q_all[:, :, 1], kv[:, :, 0], kv[:, :, 1]
    assert not q.is_contiguous()
    assert not k.is_contiguous()
    check_lse_forward(_impl(cls, 4, 32, 2), q, k, v)


def test_impls_without_lse_are_none() -> None:
    class Plain:
        def forward(self, *args: object) -> None:
            return None

    assert lse_forward(Plain()) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merging_two_key_sets_equals_attention_over_both(dtype: torch.dtype) -> None:
    q, k, v = randn_qkv(2, 11, 4, 16, m=30, dtype=dtype)
    impl = _impl(ReferenceImpl, 4, 16, 4)
    o_a, lse_a = impl.forward_with_lse(q, k[:, :12], v[:, :12], None)  # type: ignore[attr-defined]
    o_b, lse_b = impl.forward_with_lse(q, k[:, 12:], v[:, 12:], None)  # type: ignore[attr-defined]
    out, lse = merge_partials(o_a, lse_a, o_b, lse_b)
    assert rel_l2(out, dense_reference(q, k, v)) < TOLERANCE[dtype]
    assert (lse.double() - dense_lse(q, k)).abs().max().item() < (
        1e-4 if dtype == torch.float32 else 5e-2)
    target = torch.full((2, 11, 8, 16), float("nan"), dtype=dtype)
    merge_partials(o_a, lse_a, o_b, lse_b, out=target[:, :, 4:])  # a strided view of a buffer
    assert torch.equal(target[:, :, 4:], out)
    assert target[:, :, :4].isnan().all()


def test_merging_rows_that_saw_no_key_gives_zeros_not_nan() -> None:
    o = torch.zeros(1, 3, 2, 8)
    lse = torch.full((1, 2, 3), float("-inf"))
    out, merged = merge_partials(o, lse, o.clone(), lse.clone())
    assert torch.equal(out, o)
    assert torch.isneginf(merged).all()


def _partials(dtype: torch.dtype, device: str, n: int = 37, h: int = 3, d: int = 24
              ) -> tuple[torch.Tensor, ...]:
    """Two partial results over disjoint key sets (12 and 19 keys) and the dense float64 target."""
    q, k, v = randn_qkv(2, n, h, d, m=31, dtype=dtype)
    impl = _impl(ReferenceImpl, h, d, h)
    o_a, lse_a = impl.forward_with_lse(q, k[:, :12], v[:, :12], None)  # type: ignore[attr-defined]
    o_b, lse_b = impl.forward_with_lse(q, k[:, 12:], v[:, 12:], None)  # type: ignore[attr-defined]
    lse_a[0, 1, 5] = lse_b[0, 1, 5] = float("-inf")  # a row that saw no key in either part
    o_a[0, 5, 1] = o_b[0, 5, 1] = 0
    want = dense_reference(q, k, v).to(device)
    want[0, 5, 1] = 0
    return (*(t.to(device) for t in (o_a, lse_a, o_b, lse_b)), want)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_merge_writes_a_strided_view_like_the_reference(dtype: torch.dtype) -> None:
    from attnrt.kernels.triton_merge import merge_into

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under the interpreter
    o_a, lse_a, o_b, lse_b, want = _partials(dtype, device)
    target = torch.full((2, 37, 7, 24), float("nan"), dtype=dtype, device=device)
    merge_into(o_a, lse_a, o_b.transpose(1, 2).contiguous().transpose(1, 2), lse_b,
               target[:, :, 2:5])  # out_b in [B, H, N, D] memory, out a slice of heads
    assert rel_l2(target[:, :, 2:5], want) < TOLERANCE[dtype]
    assert not target[0, 5, 3].any()
    assert target[:, :, :2].isnan().all()
    assert target[:, :, 5:].isnan().all()


def test_fused_merge_refuses_what_it_cannot_read() -> None:
    from attnrt.kernels.triton_merge import merge_into

    o_a, lse_a, o_b, lse_b, _ = _partials(torch.float32, "cpu")
    with pytest.raises(ValueError, match="out must be .* unit-strided head dim"):
        merge_into(o_a, lse_a, o_b, lse_b, torch.empty(2, 37, 24, 3).transpose(2, 3))
    with pytest.raises(ValueError, match=r"out_b must be \(2, 37, 3, 24\)"):
        merge_into(o_a, lse_a, o_b[:, :30], lse_b, torch.empty_like(o_a))
    with pytest.raises(ValueError, match=r"lse_a must be float32 \(2, 3, 37\)"):
        merge_into(o_a, lse_a[:, :, :30], o_b, lse_b, torch.empty_like(o_a))


@pytest.mark.gpu
def test_merge_partials_keeps_autograd_on_the_gpu() -> None:
    """With gradients wanted the PyTorch lines run (the fused kernel has no backward)."""
    o_a, lse_a, o_b, lse_b, _ = _partials(torch.float32, "cuda")
    o_a.requires_grad_()
    out, _ = merge_partials(o_a, lse_a, o_b, lse_b)
    out.sum().backward()
    assert o_a.grad is not None
    assert torch.isfinite(o_a.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_partials_on_the_gpu_takes_the_fused_pass(
        dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    import attnrt.kernels.triton_merge as triton_merge

    calls = []
    real = triton_merge.merge_into
    monkeypatch.setattr(triton_merge, "merge_into", lambda *a: calls.append(1) or real(*a))
    o_a, lse_a, o_b, lse_b, want = _partials(dtype, "cuda", n=1000, h=4, d=128)
    target = torch.full((2, 1000, 8, 128), float("nan"), dtype=dtype, device="cuda")
    out, lse = merge_partials(o_a, lse_a, o_b, lse_b, out=target[:, :, 4:])
    assert calls == [1]
    assert rel_l2(out, want) < TOLERANCE[dtype]
    assert target[:, :, :4].isnan().all()
    assert torch.equal(lse, torch.logaddexp(lse_a, lse_b))
