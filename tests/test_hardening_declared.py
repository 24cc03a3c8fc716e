"""Hardening (issue 18): every backend's declared support is what it really runs, here.

For each registered backend, dtype, causal and GQA setting and mode (inference, training), where
`support.check` says the backend serves the request on this machine's real device, the test runs
it forward (and backward, for training) at a tiny shape and compares with the float64 reference.
A declaration that promises what the backend cannot run fails here (FLEX_ATTN used to claim
training on CPU and then raised PyTorch's NotImplementedError). Accelerator backends are checked
the same way where their device is present (the GPU machine runs this file too).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import attnrt
from attnrt.selection import registry
from attnrt.selection.capability import BACKWARD, check
from attnrt.selection.device import probe
from attnrt.selection.request import NAME_DTYPES, AttentionRequest
from tests.conftest import TOLERANCE, rel_l2
from tests.helpers import dense_reference, randn_qkv

HEAD_SIZE, HEADS, N = 16, 4, 24


def _cases() -> list:
    """Every combination a backend declares it serves on this machine's device (FLEX_ATTN's
    compile-per-shape cases are marked slow)."""
    cases = []
    for name in sorted(registry.names()):
        for dtype in ("fp16", "bf16", "fp32", "fp64"):
            for causal, gqa, grad in itertools.product((False, True), repeat=3):
                request = AttentionRequest(HEAD_SIZE, dtype, HEADS, 2 if gqa else HEADS, causal,
                                           None, grad, N)
                if not check(registry.load(name), request, probe()):
                    marks = [pytest.mark.slow] if name == "FLEX_ATTN" else []
                    cases.append(pytest.param(name, dtype, causal, gqa, grad, marks=marks))
    return cases


def _tensor_device(device: attnrt.Device) -> torch.device:
    return torch.device("cuda" if device.platform in ("cuda", "rocm") else device.platform)


@pytest.mark.parametrize(("name", "dtype", "causal", "gqa", "grad"), _cases(),
                         ids=lambda v: str(v))
def test_a_declared_request_runs_and_matches_the_reference(name: str, dtype: str, causal: bool,
                                                          gqa: bool, grad: bool) -> None:
    kv_heads = 2 if gqa else HEADS
    torch_dtype, device = NAME_DTYPES[dtype], _tensor_device(probe())
    q, k, v = (t.to(device).requires_grad_(grad) for t in randn_qkv(
        1, N, HEADS, HEAD_SIZE, kv_heads, dtype=torch_dtype, seed=7))
    impl = registry.load(name).get_impl_cls()(HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, causal,
                                              kv_heads)
    with torch.set_grad_enabled(grad):
        out = impl.forward(q, k, v, None)
    ref = dense_reference(q, k, v, causal)
    tol = TOLERANCE[torch_dtype] if torch_dtype != torch.float64 else 1e-10
    assert rel_l2(out, ref) < tol
    if not grad:
        return
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out.double().cpu())
    for g, w in zip(got, want, strict=True):
        assert rel_l2(g, w) < 4 * tol  # gradients sum over more terms


def test_flex_attention_declares_no_backward_on_cpu() -> None:
    request = AttentionRequest(HEAD_SIZE, "fp32", HEADS, grad=True)
    reasons = check(registry.load("FLEX_ATTN"), request, probe())
    if probe().platform != "cpu":
        pytest.skip("the CPU limit is checked on CPU")
    assert [r.code for r in reasons] == [BACKWARD]
    assert "grad=True" in reasons[0].message


def test_a_training_layer_on_cpu_limited_to_flex_raises_a_typed_error_before_running() -> None:
    if probe().platform != "cpu":
        pytest.skip("the CPU limit is checked on CPU")
    layer = attnrt.LocalAttention(HEADS, HEAD_SIZE, supported_attention_backends=("FLEX_ATTN",))
    q, k, v = (t.requires_grad_() for t in randn_qkv(1, 8, HEADS, HEAD_SIZE, seed=1))
    with pytest.raises(attnrt.BackendUnavailableError, match="FLEX_ATTN: grad=True"):
        layer(q, k, v)
    with torch.no_grad():  # inference still selects it
        assert layer.decision_for(torch.float32).backend == "FLEX_ATTN"
