"""Every portable backend against the float64 dense reference, generated from declared capability.

Ids look like TORCH_SDPA-cpu-bf16-h72-n257-causal-gqa. These backends return tensors that torch
ops allocate and fill (no caller buffer to poison); the Triton kernel, which writes its own
buffers, is poisoned through its `_alloc` hook in tests/kernels.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from attnrt.selection import registry
from attnrt.selection.capability import check
from attnrt.selection.device import probe
from attnrt.selection.request import AttentionRequest
from tests.conftest import TOLERANCE, rel_l2
from tests.helpers import dense_reference, randn_qkv

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (N, D, H, Hkv, M): odd sizes on purpose (N=1, N=257, D=72, N != M).
SHAPES = [(1, 64, 4, 4, None), (257, 72, 4, 2, None), (64, 128, 8, 1, None), (33, 64, 4, 4, 47)]


def _cases(names: list[str]) -> list:
    cases = []
    for name, dtype, shape, causal in itertools.product(names, DTYPES, SHAPES, (False, True)):
        n, d, h, hkv, m = shape
        gqa = "-gqa" if hkv != h else ""
        cid = f"{name}-cpu-{dtype}-h{d}-n{n}{'-m' + str(m) if m else ''}" \
              f"{'-causal' if causal else ''}{gqa}"
        cases.append(pytest.param(name, dtype, shape, causal, id=cid))
    return cases


@pytest.mark.parametrize(("name", "dtype", "shape", "causal"),
                         _cases(["REFERENCE", "TORCH_SDPA"]))
def test_portable_backend_matches_float64(name, dtype, shape, causal):
    n, d, h, hkv, m = shape
    request = AttentionRequest(d, dtype, h, hkv, causal)
    cls = registry.load(name)
    reasons = check(cls, request, probe())
    # Both portable backends declare support for every case here; a refusal would be a bug.
    assert reasons == [], reasons
    q, k, v = randn_qkv(2, n, h, d, hkv, m, dtype=DTYPES[dtype])
    impl = cls.get_impl_cls()(h, d, d ** -0.5, causal, hkv)
    out = impl.forward(q, k, v, None)
    assert out.shape == q.shape
    assert out.dtype == q.dtype
    assert rel_l2(out, dense_reference(q, k, v, causal)) < TOLERANCE[DTYPES[dtype]]


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "causal", "hkv"), [("fp32", False, 4), ("fp32", True, 2)])
def test_flex_attention_compiled_on_cpu(dtype, causal, hkv):
    from attnrt.backends.flex import FlexAttentionImpl

    q, k, v = randn_qkv(1, 128, 4, 64, hkv, dtype=DTYPES[dtype])
    out = FlexAttentionImpl(4, 64, 0.125, causal, hkv).forward(q, k, v, None)
    assert rel_l2(out, dense_reference(q, k, v, causal, 0.125)) < TOLERANCE[DTYPES[dtype]]


@pytest.mark.slow
def test_flex_attention_keeps_compiling_past_dynamos_recompile_limit(monkeypatch):
    # With dynamo's limit at 1, the second shape would run flex_attention eagerly (unfused,
    # every score materialized); compiling it lifts the limit.
    import torch._dynamo

    from attnrt.backends import flex

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(config, name, 1)
    flex._compiled.cache_clear()
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["frames"]
    before = frames["ok"]
    try:
        for n in (48, 80):
            q, k, v = randn_qkv(1, n, 2, 16)
            out = flex.flex_bnhd(q, k, v, False, None)
            assert rel_l2(out, dense_reference(q, k, v, False)) < TOLERANCE[torch.float32]
        assert frames["ok"] - before == 2  # both shapes compiled (eager ones count no frame)
        assert getattr(config, name) == flex.RECOMPILE_LIMIT
    finally:
        flex._compiled.cache_clear()  # the limit goes back: the next compile raises it again


def test_reference_gradients_match_float64():
    q, k, v = (t.double().requires_grad_() for t in randn_qkv(1, 17, 4, 32, 2))
    from attnrt.backends.reference import chunked_attention

    out = chunked_attention(q, k, v, causal=True, chunk_bytes=256)  # many tiny chunks
    grad = torch.randn_like(out)
    out.backward(grad)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = _dense_autograd(q2, k2, v2)
    ref.backward(grad)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert rel_l2(a.grad, b.grad) < 1e-12


def _dense_autograd(q, k, v):
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * q.shape[-1] ** -0.5
    n = q.shape[1]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)


def test_reference_rows_that_see_no_key_are_zero():
    from attnrt.backends.reference import chunked_attention

    q, k, v = randn_qkv(1, 8, 2, 16, m=5)
    out = chunked_attention(q, k, v, causal=True)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))  # rows 0..2 see no key
    assert rel_l2(out, dense_reference(q, k, v, causal=True)) < 1e-5


def test_reference_is_deterministic():
    from attnrt.backends.reference import chunked_attention

    q, k, v = randn_qkv(1, 100, 4, 64)
    assert torch.equal(chunked_attention(q, k, v), chunked_attention(q, k, v))


@pytest.mark.slow
def test_reference_memory_is_bounded():
    """N=8192, 8 heads, D=64: dense fp32 scores would need 2.1 GB; the chunked path stays small."""
    import subprocess
    import sys

    code = ("import resource, torch; from attnrt.backends.reference import chunked_attention; "
            "q = torch.randn(1, 8192, 8, 64); k = torch.randn_like(q); v = torch.randn_like(q); "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "out = chunked_attention(q, k, v); assert torch.isfinite(out).all(); "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    growth_mb = int(res.stdout.strip())
    assert growth_mb < 512, f"peak grew by {growth_mb} MB"
