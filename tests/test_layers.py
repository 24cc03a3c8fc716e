"""LocalAttention: input validation, re-selection on dtype change, rotary, GQA, compile fallback."""

from __future__ import annotations

import logging

import pytest
import torch

import attnrt
from attnrt import layers as layers_module
from attnrt.errors import KernelCompileError
from attnrt.layers import apply_rotary_emb
from attnrt.selection import dispatch
from tests.conftest import TOLERANCE, rel_l2
from tests.helpers import CountingImpl, dense_reference, make_backend, randn_qkv


class TestBadInput:
    layer_args = {"num_heads": 4, "head_size": 32, "num_kv_heads": 2}

    @pytest.fixture
    def layer(self):
        return attnrt.LocalAttention(**self.layer_args)

    @pytest.fixture
    def qkv(self):
        return randn_qkv(1, 8, 4, 32, 2)

    def test_three_dimensional_input(self, layer, qkv):
        q, k, v = qkv
        with pytest.raises(ValueError, match=r"q has shape \(8, 4, 32\); expected 4-D"):
            layer(q[0], k, v)

    def test_wrong_head_count(self, layer):
        q, k, v = randn_qkv(1, 8, 6, 32, 2)
        with pytest.raises(ValueError, match="q has 6 heads; the layer was built for num_heads=4"):
            layer(q, k, v)

    def test_wrong_kv_head_count(self, layer):
        q, k, v = randn_qkv(1, 8, 4, 32, 4)
        with pytest.raises(ValueError, match="k has 4 heads;.*num_kv_heads=2"):
            layer(q, k, v)

    def test_wrong_head_size(self, layer):
        q, k, v = randn_qkv(1, 8, 4, 16, 2)
        with pytest.raises(ValueError, match="q has head size 16;.*head_size=32"):
            layer(q, k, v)

    def test_batch_mismatch(self, layer, qkv):
        q, k, v = qkv
        with pytest.raises(ValueError, match=r"batch of q \(2\) and k/v \(1\)"):
            layer(torch.cat([q, q]), k, v)

    def test_kv_length_mismatch(self, layer, qkv):
        q, k, v = qkv
        with pytest.raises(ValueError, match=r"k.shape=.* and v.shape=.* must match"):
            layer(q, k, v[:, :5])

    def test_dtype_mismatch(self, layer, qkv):
        q, k, v = qkv
        with pytest.raises(TypeError, match="dtypes must match"):
            layer(q, k.half(), v)

    def test_integer_dtype(self, layer, qkv):
        q, k, v = (t.long() for t in qkv)
        with pytest.raises(TypeError, match="not a floating dtype"):
            layer(q, k, v)


def test_gqa_layer_matches_float64():
    layer = attnrt.LocalAttention(8, 64, num_kv_heads=2, causal=True)
    q, k, v = randn_qkv(2, 40, 8, 64, 2)
    assert rel_l2(layer(q, k, v), dense_reference(q, k, v, causal=True)) < 1e-5


def test_softmax_scale_is_used():
    layer = attnrt.LocalAttention(2, 32, softmax_scale=0.3)
    q, k, v = randn_qkv(1, 16, 2, 32)
    assert rel_l2(layer(q, k, v), dense_reference(q, k, v, scale=0.3)) < 1e-5


def test_rotary_pairs_rotate_as_complex_numbers():
    q, k, v = randn_qkv(1, 6, 2, 8)
    angles = torch.randn(6, 4)
    cos, sin = angles.cos(), angles.sin()
    as_complex = torch.view_as_complex(q.reshape(1, 6, 2, 4, 2).contiguous())
    rotated = as_complex * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    expected = torch.view_as_real(rotated).reshape(1, 6, 2, 8)
    assert rel_l2(apply_rotary_emb(q, cos, sin), expected) < 1e-6
    layer = attnrt.LocalAttention(2, 8)
    out = layer(q, k, v, freqs_cis=(cos, sin))
    ref = dense_reference(apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin), v)
    assert rel_l2(out, ref) < 1e-5


def test_dtype_change_reselects_instead_of_running_outside_support(register, write_yaml,
                                                                   monkeypatch):
    fp32_only = register("FP32_ONLY", make_backend("FP32_ONLY", DTYPES=frozenset({"fp32"})))
    monkeypatch.setenv("ATTNRT_CAPABILITY", write_yaml(
        "schema: 1\nrules:\n  - platform: cpu\n    rank: [FP32_ONLY, TORCH_SDPA]\n"))
    layer = attnrt.LocalAttention(2, 32)
    q, k, v = randn_qkv(1, 16, 2, 32)
    layer(q, k, v)
    assert layer.backend_name == "FP32_ONLY"
    assert fp32_only.forward_calls == 1
    out = layer(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert layer.backend_name == "TORCH_SDPA"
    assert fp32_only.forward_calls == 1
    assert out.dtype == torch.bfloat16
    layer(q, k, v)
    assert layer.backend_name == "FP32_ONLY"
    assert fp32_only.forward_calls == 2


def _cpu_rules(write_yaml, monkeypatch, *rules: tuple[str, str]) -> None:
    """An override manifest of cpu rules, each (condition line or "", first backend), the
    backend ranked before TORCH_SDPA."""
    body = "".join("  - platform: cpu\n" + (f"    {cond}\n" if cond else "")
                   + f"    rank: [{first}, TORCH_SDPA]\n" for cond, first in rules)
    monkeypatch.setenv("ATTNRT_CAPABILITY", write_yaml("schema: 1\nrules:\n" + body))


def test_autograd_mode_selects_by_the_rules_grad_key(register, write_yaml, monkeypatch):
    infer = register("INFER_ATTN", make_backend("INFER_ATTN"))
    train = register("TRAIN_ATTN", make_backend("TRAIN_ATTN"))
    _cpu_rules(write_yaml, monkeypatch, ("grad: false", "INFER_ATTN"),
               ("grad: true", "TRAIN_ATTN"))
    layer = attnrt.LocalAttention(2, 32)
    q, k, v = randn_qkv(1, 16, 2, 32)
    with torch.no_grad():
        layer(q, k, v)
    assert layer.backend_name == "INFER_ATTN"
    assert layer.decision.request.grad is False
    inference_impl = layer._active.impl
    layer(q.requires_grad_(), k, v)  # autograd on: the training rule
    assert layer.backend_name == "TRAIN_ATTN"
    assert "with backward" in layer.decision.explain()
    with torch.inference_mode():
        layer(q.detach(), k, v)
    assert layer.backend_name == "INFER_ATTN"
    assert layer._active.impl is inference_impl  # cached per mode, not rebuilt
    assert (infer.forward_calls, train.forward_calls) == (2, 1)


def test_query_length_selects_by_the_rules_seq_len_key(register, write_yaml, monkeypatch):
    short = register("SHORT_ATTN", make_backend("SHORT_ATTN"))
    long = register("LONG_ATTN", make_backend("LONG_ATTN"))
    _cpu_rules(write_yaml, monkeypatch, ("seq_len: '<=32'", "SHORT_ATTN"), ("", "LONG_ATTN"))
    layer = attnrt.LocalAttention(2, 32)
    assert layer.backend_name == "LONG_ATTN"  # built before any length is known
    selects = []
    real = dispatch.select
    monkeypatch.setattr(layers_module, "select",
                        lambda *a, **kw: selects.append(1) or real(*a, **kw))
    # (length, backend, the length the serving decision was made for)
    for n, want, decided_at in ((16, "SHORT_ATTN", 16), (32, "SHORT_ATTN", 16),
                                (33, "LONG_ATTN", 33), (500, "LONG_ATTN", 33),
                                (5, "SHORT_ATTN", 16)):
        layer(*randn_qkv(1, n, 2, 32))
        assert layer.backend_name == want, n
        assert layer.decision.request.seq_len == decided_at
    assert len(selects) == 2  # one per span of lengths, each cached after its first call
    assert (short.forward_calls, long.forward_calls) == (3, 2)
    text = layer.decision_for(torch.float32, seq_len=20).explain()
    assert "N=20" in text
    assert "seq_len=<=32" in text


def test_empty_queries_and_one_impl_per_backend_across_spans(write_yaml, monkeypatch):
    _cpu_rules(write_yaml, monkeypatch, ("seq_len: '<=32'", "REFERENCE"), ("", "REFERENCE"))
    layer = attnrt.LocalAttention(2, 32)
    assert layer(*randn_qkv(1, 0, 2, 32)).shape == (1, 0, 2, 32)  # N=0 selects like any N
    layer(*randn_qkv(1, 16, 2, 32))
    short = layer._active
    layer(*randn_qkv(1, 40, 2, 32))
    assert layer._active is not short  # another span, another decision ...
    assert layer._active.impl is short.impl  # ... of the same backend: its one impl


def test_without_seq_len_rules_the_request_carries_no_length(register):
    layer = attnrt.LocalAttention(2, 32)
    layer(*randn_qkv(1, 16, 2, 32))
    layer(*randn_qkv(1, 48, 2, 32))
    assert layer.decision.request.seq_len is None  # one decision serves every length
    assert [len(spans) for spans in layer._by_key.values()] == [1]


class FailingImpl(CountingImpl):
    def forward(self, query, key, value, attn_metadata):
        type(self).backend.forward_calls += 1
        raise KernelCompileError("out of shared memory for BLOCK_M=256")


@pytest.fixture
def failing_first(register, write_yaml, monkeypatch):
    backend = make_backend("FLAKY_ATTN")
    backend.get_impl_cls = classmethod(lambda cls: type("FlakyImpl", (FailingImpl,),
                                                        {"backend": cls}))
    register("FLAKY_ATTN", backend)
    monkeypatch.setenv("ATTNRT_CAPABILITY", write_yaml(
        "schema: 1\nrules:\n  - platform: cpu\n    rank: [FLAKY_ATTN, TORCH_SDPA]\n"))
    return backend


def test_compile_failure_falls_to_next_backend_with_one_warning(failing_first, caplog):
    layer = attnrt.LocalAttention(2, 32)
    q, k, v = randn_qkv(1, 16, 2, 32)
    older = attnrt.LocalAttention(2, 32)  # selected FLAKY_ATTN for fp32 before the failure
    assert older.backend_name == "FLAKY_ATTN"
    with caplog.at_level(logging.WARNING, logger="attnrt"):
        out = layer(q, k, v)
        layer(q, k, v)
        attnrt.LocalAttention(2, 32)(q, k, v)  # a new layer skips it without trying again
        older(q, k, v)  # so does a layer built before the failure
    assert failing_first.forward_calls == 1  # only the failure itself ran it
    assert older.backend_name == "TORCH_SDPA"
    assert layer.backend_name == "TORCH_SDPA"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "FLAKY_ATTN failed" in warnings[0].getMessage()
    assert rel_l2(out, dense_reference(q, k, v)) < 1e-5
    reasons = attnrt.explain(head_size=32, dtype="fp32", num_heads=2).candidates[0].reasons
    assert reasons[-1].code == "COMPILE_FAILED"


def test_compile_failure_raises_under_strict(failing_first, monkeypatch):
    monkeypatch.setenv("ATTNRT_STRICT", "1")
    layer = attnrt.LocalAttention(2, 32)
    with pytest.raises(KernelCompileError, match="shared memory"):
        layer(*randn_qkv(1, 16, 2, 32))


def test_other_errors_are_never_swallowed(register, write_yaml, monkeypatch):
    class Boom(CountingImpl):
        def forward(self, query, key, value, attn_metadata):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    backend = make_backend("BOOM_ATTN")
    backend.get_impl_cls = classmethod(lambda cls: type("BoomImpl", (Boom,), {"backend": cls}))
    register("BOOM_ATTN", backend)
    monkeypatch.setenv("ATTNRT_CAPABILITY", write_yaml(
        "schema: 1\nrules:\n  - platform: cpu\n    rank: [BOOM_ATTN]\n"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        attnrt.LocalAttention(2, 32)(*randn_qkv(1, 16, 2, 32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer(dtype):
    layer = attnrt.LocalAttention(4, 64)
    q, k, v = randn_qkv(1, 65, 4, 64, dtype=dtype)
    assert rel_l2(layer(q, k, v), dense_reference(q, k, v)) < TOLERANCE[dtype]


def test_forced_16bit_backend_does_not_break_construction_in_fp32(register, monkeypatch):
    """Models are built in fp32 and cast: the layer selects again at the first forward."""
    half = register("HALF_ONLY", make_backend("HALF_ONLY", DTYPES=frozenset({"fp16", "bf16"})))
    monkeypatch.setenv("ATTNRT_BACKEND", "HALF_ONLY")
    layer = attnrt.LocalAttention(2, 32)
    assert layer.decision.backend is None  # the fp32 decision, kept for explain
    q, k, v = randn_qkv(1, 16, 2, 32, dtype=torch.bfloat16)
    layer(q, k, v)
    assert layer.backend_name == "HALF_ONLY"
    assert half.forward_calls == 1
    with pytest.raises(attnrt.BackendUnavailableError, match="dtype=fp32 is not supported"):
        layer(q.float(), k.float(), v.float())


def test_a_force_after_construction_applies_at_the_next_forward():
    layer = attnrt.LocalAttention(2, 32)
    q, k, v = randn_qkv(1, 16, 2, 32)
    layer(q, k, v)
    assert layer.backend_name == "TORCH_SDPA"
    with attnrt.force_backend("REFERENCE"):
        layer(q, k, v)
        assert layer.backend_name == "REFERENCE"
    layer(q, k, v)
    assert layer.backend_name == "TORCH_SDPA"
    with attnrt.global_force_attn_backend_context_manager("REFERENCE"):
        layer(q, k, v)
        assert layer.backend_name == "REFERENCE"


def test_rotary_tables_of_the_wrong_shape_are_named():
    layer = attnrt.LocalAttention(2, 8)
    q, k, v = randn_qkv(1, 6, 2, 8)
    with pytest.raises(ValueError, match=r"freqs_cis cos/sin have shape \(5, 4\)"):
        layer(q, k, v, freqs_cis=(torch.randn(5, 4), torch.randn(5, 4)))


def test_a_force_in_one_thread_does_not_leak_into_another_sharing_the_layer():
    import threading

    layer = attnrt.LocalAttention(2, 32)
    q, k, v = randn_qkv(1, 16, 2, 32)
    seen = {}

    def forced_thread():
        with attnrt.force_backend("REFERENCE"):
            layer(q, k, v)
            seen["thread"] = layer.backend_name

    t = threading.Thread(target=forced_thread)
    t.start()
    t.join()
    layer(q, k, v)
    assert seen["thread"] == "REFERENCE"
    assert layer.backend_name == "TORCH_SDPA"


def test_entering_a_force_keeps_impls_of_unforced_callers():
    layer = attnrt.LocalAttention(2, 32)
    q, k, v = randn_qkv(1, 16, 2, 32)
    layer(q, k, v)
    impl = layer._active.impl
    with attnrt.force_backend("REFERENCE"):
        pass
    layer(q, k, v)
    assert layer._active.impl is impl


def test_a_failure_with_autograd_on_is_remembered_with_it_off(failing_first):
    q, k, v = randn_qkv(1, 16, 2, 32)
    attnrt.LocalAttention(2, 32)(q, k, v)  # autograd on: fails, records, falls back
    layer = attnrt.LocalAttention(2, 32)
    with torch.no_grad():
        out = layer(q, k, v)
    assert layer.backend_name == "TORCH_SDPA"
    assert failing_first.forward_calls == 1
    assert rel_l2(out, dense_reference(q, k, v)) < 1e-5


def test_decision_for_sees_a_failure_recorded_by_another_layer(failing_first):
    q, k, v = randn_qkv(1, 16, 2, 32)
    other = attnrt.LocalAttention(2, 32)
    assert other.decision_for(torch.float32, q.device).backend == "FLAKY_ATTN"
    attnrt.LocalAttention(2, 32)(q, k, v)  # fails, records, falls back
    assert other.decision_for(torch.float32, q.device).backend == "TORCH_SDPA"
    assert type(other.impl_for(torch.float32, q.device)).__name__ == "TorchSdpaImpl"


class TestModuleCall:
    """LocalAttention.__call__ skips nn.Module's hook machinery only where no hook can run:
    every kind of hook still runs, and module.compile() still compiles."""

    @staticmethod
    def _qkv() -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(1, 8, 2, 16) for _ in range(3))

    def test_forward_and_pre_hooks_run(self):
        layer = attnrt.LocalAttention(2, 16)
        seen: list[str] = []
        pre = layer.register_forward_pre_hook(lambda mod, args: seen.append("pre"))
        post = layer.register_forward_hook(lambda mod, args, out: out * 2)
        q, k, v = self._qkv()
        with torch.no_grad():
            doubled = layer(q, k, v)
            pre.remove()
            post.remove()
            plain = layer(q, k, v)
        assert seen == ["pre"]
        assert torch.equal(doubled, plain * 2)

    def test_global_hooks_run(self):
        from torch.nn.modules.module import register_module_forward_hook

        layer = attnrt.LocalAttention(2, 16)
        calls: list[type] = []
        handle = register_module_forward_hook(lambda mod, args, out: calls.append(type(mod)))
        try:
            with torch.no_grad():
                layer(*self._qkv())
        finally:
            handle.remove()
        assert calls == [attnrt.LocalAttention]

    def test_backward_hooks_run(self):
        layer = attnrt.LocalAttention(2, 16)
        grads: list[torch.Size] = []
        layer.register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0].shape))
        q, k, v = (t.requires_grad_() for t in self._qkv())
        layer(q, k, v).sum().backward()
        assert grads == [torch.Size([1, 8, 2, 16])]
