"""Attention methods: what is computed is part of the request; no method is served by another."""

from __future__ import annotations

import pytest
import torch

import attnrt
from attnrt.errors import BackendUnavailableError, ManifestError
from attnrt.selection import methods
from attnrt.selection.dispatch import decide, force_backend
from attnrt.selection.manifest import load_capability, validate_files
from attnrt.selection.methods import MethodError
from attnrt.selection.request import AttentionRequest
from attnrt.tools.cli import main as cli_main
from tests.helpers import make_backend, randn_qkv

VSA_RULES = """
schema: 1
rules:
  - method: vsa
    platform: cpu
    rank: [FAKE_VSA, FAKE_VSA_SLOW]
"""


@pytest.fixture
def sparse_backends(register, write_yaml, monkeypatch):
    """Two vsa implementations on cpu, ranked by an override manifest, and a method alias
    TEST_SPARSE_ATTN (as FastVideo's VIDEO_SPARSE_ATTN names vsa)."""
    fast = register("FAKE_VSA", make_backend("FAKE_VSA", METHODS=frozenset({"vsa"})))
    slow = register("FAKE_VSA_SLOW", make_backend("FAKE_VSA_SLOW", METHODS=frozenset({"vsa"})))
    monkeypatch.setitem(methods.METHOD_ALIASES, "TEST_SPARSE_ATTN", "vsa")
    monkeypatch.setenv("ATTNRT_CAPABILITY", write_yaml(VSA_RULES))
    return fast, slow


def test_request_carries_a_known_method_and_refuses_others():
    assert AttentionRequest(64, "fp32").method == "dense"
    assert AttentionRequest(64, "fp32", method="VSA").method == "vsa"
    with pytest.raises(MethodError, match="method='sparse'.*allowed: dense, vsa"):
        AttentionRequest(64, "fp32", method="sparse")
    with pytest.raises(MethodError):
        attnrt.LocalAttention(2, 64, method="sparse")


def test_a_sparse_request_takes_its_methods_ranking(sparse_backends):
    decision = decide(AttentionRequest(64, "fp32", method="vsa"))
    assert decision.backend == "FAKE_VSA"
    assert "method vsa" in decision.request.describe()


def test_a_dense_request_never_reaches_a_sparse_backend(sparse_backends, write_yaml):
    # Even allowed by name, the sparse backend refuses a dense request with a METHOD reason.
    decision = decide(AttentionRequest(64, "fp32", allowed=("FAKE_VSA", "REFERENCE")))
    assert decision.backend == "REFERENCE"
    refusal = next(c for c in decision.candidates if c.name == "FAKE_VSA")
    assert refusal.reasons[0].code == "METHOD"
    assert "implements: vsa" in refusal.verdict()


def test_a_sparse_method_that_cannot_run_is_an_error_not_dense(sparse_backends):
    fast, slow = sparse_backends
    fast.DTYPES = slow.DTYPES = frozenset({"fp16"})
    attnrt.clear_caches()
    decision = decide(AttentionRequest(64, "fp32", method="vsa"))
    assert decision.backend is None  # REFERENCE (dense) is not a last resort for vsa
    assert [c.name for c in decision.candidates] == ["FAKE_VSA", "FAKE_VSA_SLOW"]
    with pytest.raises(BackendUnavailableError, match="FAKE_VSA: dtype=fp32"):
        attnrt.select(AttentionRequest(64, "fp32", method="vsa"))


def test_a_method_alias_forces_the_method_not_one_implementation(sparse_backends, monkeypatch):
    fast, slow = sparse_backends
    monkeypatch.setenv("ATTNRT_BACKEND", "TEST_SPARSE_ATTN")
    layer = attnrt.LocalAttention(2, 64, supported_attention_backends=("TEST_SPARSE_ATTN",
                                                                        "TORCH_SDPA"))
    q, k, v = randn_qkv(1, 8, 2, 64)
    layer(q, k, v)
    assert layer.decision.request.method == "vsa"
    assert layer.backend_name == "FAKE_VSA"  # the best ranked vsa implementation
    assert any("names method vsa" in n for n in layer.decision.notes)
    assert fast.forward_calls == 1
    assert slow.forward_calls == 0


def test_a_sparse_force_leaves_layers_that_do_not_allow_it_dense(sparse_backends, monkeypatch):
    monkeypatch.setenv("ATTNRT_BACKEND", "TEST_SPARSE_ATTN")
    cross = attnrt.LocalAttention(2, 64, supported_attention_backends=("TORCH_SDPA",
                                                                        "REFERENCE"))
    assert cross.decision.request.method == "dense"
    assert cross.backend_name in ("TORCH_SDPA", "REFERENCE")


def test_forcing_one_implementation_pins_it(sparse_backends):
    layer = attnrt.LocalAttention(2, 64, method="vsa")
    with force_backend("FAKE_VSA_SLOW"):
        q, k, v = randn_qkv(1, 8, 2, 64)
        layer(q, k, v)
        assert layer.backend_name == "FAKE_VSA_SLOW"


def test_a_dense_force_on_a_sparse_layer_raises(sparse_backends):
    layer = attnrt.LocalAttention(2, 64, method="vsa")
    q, k, v = randn_qkv(1, 8, 2, 64)
    with force_backend("TORCH_SDPA"), pytest.raises(BackendUnavailableError,
                                                    match="method=vsa is not implemented"):
        layer(q, k, v)


def test_allowing_the_alias_allows_every_implementation_of_the_method(sparse_backends):
    fast, _ = sparse_backends
    fast.DTYPES = frozenset({"fp16"})
    attnrt.clear_caches()
    layer = attnrt.LocalAttention(2, 64, supported_attention_backends=("TEST_SPARSE_ATTN",))
    assert layer.decision.request.method == "vsa"  # the allow-list names only vsa
    assert layer.backend_name == "FAKE_VSA_SLOW"


def test_manifest_method_key_is_validated(write_yaml, register):
    register("FAKE_VSA", make_backend("FAKE_VSA", METHODS=frozenset({"vsa"})))
    bad = write_yaml("schema: 1\nrules:\n  - method: sparse\n    rank: [REFERENCE]\n")
    with pytest.raises(ManifestError, match="method.*'sparse'"):
        load_capability(bad)
    mixed = write_yaml("schema: 1\nrules:\n  - method: vsa\n    rank: [FAKE_VSA, TORCH_SDPA]\n",
                       "mixed.yaml")
    errors = validate_files([mixed])
    assert any("TORCH_SDPA can never serve" in e and "method dense" in e for e in errors)


def test_a_rule_without_method_ranks_dense_only(write_yaml, register, monkeypatch):
    register("FAKE_VSA", make_backend("FAKE_VSA", METHODS=frozenset({"vsa"})))
    override = write_yaml("schema: 1\nrules:\n  - platform: cpu\n    rank: [TORCH_SDPA]\n")
    monkeypatch.setenv("ATTNRT_CAPABILITY", override)
    assert decide(AttentionRequest(64, "fp32")).rule.file == override
    vsa_rule = decide(AttentionRequest(64, "fp32", method="vsa")).rule
    assert vsa_rule is None or vsa_rule.file != override  # the shipped vsa rules may match


def test_register_method_with_its_last_resort(register, monkeypatch):
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))
    monkeypatch.setattr(methods, "_LAST_RESORTS", dict(methods._LAST_RESORTS))
    register("TOY_REF", make_backend("TOY_REF", METHODS=frozenset({"toy"})))
    methods.register_method("toy", "a test method", last_resort="TOY_REF")
    decision = decide(AttentionRequest(64, "fp32", method="toy"))
    assert decision.backend == "TOY_REF"
    assert decision.candidates[-1].note == "last resort"
    with pytest.raises(MethodError):
        methods.register_method("Bad Name", "x")


def test_explain_cli_takes_a_method(sparse_backends, capsys):
    assert cli_main(["explain", "--head-size", "64", "--dtype", "fp32", "--method", "vsa"]) == 0
    out = capsys.readouterr().out
    assert "method vsa" in out
    assert "FAKE_VSA" in out
    assert cli_main(["info"]) == 0
    assert "[vsa]" in capsys.readouterr().out


def test_an_nn_module_impl_is_the_layers_attn_impl(register):
    class ParamImpl(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.proj_l = torch.nn.Linear(4, 4)

        def forward(self, q, k, v, attn_metadata):
            return q

    backend = make_backend("PARAM", get_impl_cls=classmethod(lambda cls: ParamImpl))
    register("PARAM", backend)
    layer = attnrt.LocalAttention(2, 4, supported_attention_backends=("PARAM",))
    keys = set(layer.state_dict())
    assert keys == {"attn_impl.proj_l.weight", "attn_impl.proj_l.bias"}


def test_a_distributed_layers_nn_module_impl_has_fastvideos_key_once(register):
    """DistributedAttention's LocalAttentions (one per SP size) share one nn.Module impl,
    registered on the layer as attn_impl: FastVideo's checkpoint keys, and one set of weights."""

    class ParamImpl(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.proj_l = torch.nn.Linear(4, 4)

        def forward(self, q, k, v, attn_metadata):
            return q

    register("PARAM", make_backend("PARAM", get_impl_cls=classmethod(lambda cls: ParamImpl)))
    layer = attnrt.DistributedAttention(2, 4, supported_attention_backends=("PARAM",))
    one, two = layer.local_for(1), layer.local_for(2)
    assert set(layer.state_dict()) == {"attn_impl.proj_l.weight", "attn_impl.proj_l.bias"}
    assert one.impl_for(torch.float32) is two.impl_for(torch.float32)
    state = {k: torch.zeros_like(v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)  # strict: exactly FastVideo's keys
    assert torch.count_nonzero(one.impl_for(torch.float32).proj_l.weight) == 0
