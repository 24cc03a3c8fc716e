"""The engine's backends through LocalAttention: selection, explain, the getting-started
variant in ten lines, and the fall-through when a variant cannot be traced or is not softmax.
The backends are registered per test (the integrator registers them for real)."""

from __future__ import annotations

import pytest
import torch

import attnrt
from attnrt.engine.backends import FlexEngineBackend, ReferenceEngineBackend, TritonEngineBackend
from attnrt.engine.online import OnlineIdentity
from tests.conftest import rel_l2
from tests.engine.cases import attend, grid, scores
from tests.helpers import randn_qkv

RANK = "[ENGINE_FLEX, ENGINE_REFERENCE]"  # the manifest refuses ENGINE_TRITON on cpu


@pytest.fixture
def engines(register, write_yaml, monkeypatch):
    for cls in (TritonEngineBackend, FlexEngineBackend, ReferenceEngineBackend):
        register(cls.NAME, cls)
    monkeypatch.setenv("ATTNRT_CAPABILITY", write_yaml(
        f"schema: 1\nrules:\n  - platform: cpu\n    rank: {RANK}\n"))


def test_getting_started_variant_in_ten_lines_runs_through_local_attention(engines):
    # --- the user's code: ALiBi-style bias and a causal mask, ten lines ---
    def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        return score - 0.1 * (q_idx - kv_idx)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    layer = attnrt.LocalAttention(2, 16, score_mod=score_mod, mask_mod=mask_mod)
    q, k, v = randn_qkv(1, 24, 2, 16, dtype=torch.float32, seed=3)
    with torch.no_grad():
        out = layer(q, k, v)
    # --- end of user code ---
    i, j = grid(24, 24)
    dense = attend(scores(q, k) * 16 ** -0.5 - 0.1 * (i - j), j <= i, v)
    assert rel_l2(out, dense) < 1e-5
    decision = layer.decision
    assert decision.backend == "ENGINE_FLEX"
    assert "ENGINE_FLEX" in decision.summary()


def test_training_on_cpu_skips_flex_with_its_reason(engines):
    layer = attnrt.LocalAttention(2, 16, score_mod=lambda s, c, b, h, qi, ki: s * 2.0)
    q, k, v = (t.requires_grad_() for t in randn_qkv(1, 8, 2, 16, seed=4))
    layer(q, k, v).sum().backward()
    assert layer.decision.backend == "ENGINE_REFERENCE"
    assert "FlexAttention has no CPU backward" in layer.decision.summary()
    assert q.grad is not None
    assert torch.isfinite(q.grad).all()


def test_flex_refuses_a_non_softmax_reduction_at_first_forward_and_the_next_serves(engines,
                                                                                 caplog):
    layer = attnrt.LocalAttention(2, 16, score_mod=lambda s, c, b, h, qi, ki: s.sigmoid(),
                                  online_func=OnlineIdentity())
    q, k, v = randn_qkv(1, 8, 2, 16, seed=5)
    with torch.no_grad():
        out = layer(q, k, v)
    assert "ENGINE_FLEX failed" in caplog.text
    assert "online softmax only" in caplog.text
    assert layer.decision.backend == "ENGINE_REFERENCE"
    p = torch.sigmoid(scores(q, k) * 16 ** -0.5)
    assert rel_l2(out, torch.einsum("bhnm,bmhd->bnhd", p, v.double())) < 1e-5


def test_untraceable_score_mod_falls_to_the_reference_which_calls_python(engines, caplog):
    def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        return torch.special.erf(score)  # outside the traced op set

    layer = attnrt.LocalAttention(2, 16, score_mod=score_mod)
    q, k, v = randn_qkv(1, 8, 2, 16, seed=6)
    with torch.no_grad():
        out = layer(q, k, v)
    assert "ENGINE_FLEX failed" in caplog.text
    assert "score_mod cannot be traced" in caplog.text
    assert layer.decision.backend == "ENGINE_REFERENCE"
    s = torch.special.erf(scores(q, k) * 16 ** -0.5)
    assert rel_l2(out, attend(s, None, v)) < 1e-5


@pytest.mark.parametrize(("cls", "fields", "device", "words"), [
    (TritonEngineBackend, {"dtype": "fp64"}, "cuda:sm90", "dtype=fp64 is not supported"),
    (TritonEngineBackend, {"head_size": 512}, "cuda:sm90", "head_size=512 is not supported"),
    (TritonEngineBackend, {}, "cuda:sm75", "arch=sm75 is not supported"),
    (TritonEngineBackend, {}, "cpu", "platform=cpu is not supported"),
    (FlexEngineBackend, {"head_size": 80}, "cuda:sm90", "head_size=80 is not supported"),
    (FlexEngineBackend, {"grad": True}, "cpu", "grad=True is not supported by ENGINE_FLEX"),
])
def test_declared_limits_are_refused_with_the_limit_named(cls, fields, device, words):
    from attnrt.selection.capability import check
    from attnrt.selection.device import parse_device_spec

    request = attnrt.AttentionRequest(**{"head_size": 64, "dtype": "bf16", **fields})
    reasons = check(cls, request, parse_device_spec(device))
    assert any(words in str(r) for r in reasons), reasons
    ok = check(cls, attnrt.AttentionRequest(head_size=64, dtype="bf16"),
               parse_device_spec("cuda:sm90"))
    assert ok == [] or cls is TritonEngineBackend  # triton may be absent on this machine


def test_reference_engine_backend_serves_anything():
    from attnrt.selection.capability import check
    from attnrt.selection.device import parse_device_spec

    request = attnrt.AttentionRequest(head_size=72, dtype="fp64", grad=True)
    assert check(ReferenceEngineBackend, request, parse_device_spec("cuda:sm70")) == []
    assert "custom" in ReferenceEngineBackend.METHODS


@pytest.mark.gpu
def test_local_attention_on_cuda_runs_the_generated_kernels(register, write_yaml, monkeypatch):
    for cls in (TritonEngineBackend, FlexEngineBackend, ReferenceEngineBackend):
        register(cls.NAME, cls)
    monkeypatch.setenv("ATTNRT_CAPABILITY", write_yaml(
        "schema: 1\nrules:\n  - platform: cuda\n"
        "    rank: [ENGINE_TRITON, ENGINE_FLEX, ENGINE_REFERENCE]\n"))

    def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        return score - 0.05 * (q_idx - kv_idx).abs()

    layer = attnrt.LocalAttention(4, 64, score_mod=score_mod, causal=True)
    q, k, v = (t.cuda().requires_grad_() for t in randn_qkv(2, 300, 4, 64,
                                                            dtype=torch.bfloat16, seed=8))
    out = layer(q, k, v)
    out.float().sum().backward()
    assert layer.decision.backend == "ENGINE_TRITON"
    i, j = grid(300, 300)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    dense = attend(scores(q64, k64) * 64 ** -0.5 - 0.05 * (i - j).abs(), j <= i, v64)
    dense.sum().backward()
    assert rel_l2(out, dense) < 1.5e-2
    assert rel_l2(q.grad, q64.grad) < 3e-2
