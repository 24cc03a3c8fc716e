"""The FastVideo-compatible contract: a MY_NEW_ATTN-style backend plugs in by registration."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import attnrt
from attnrt.interfaces import AttentionBackend, AttentionImpl, AttentionMetadata
from attnrt.selection import registry
from tests.conftest import TOLERANCE, rel_l2
from tests.helpers import dense_reference, randn_qkv


# --- a port of the MY_NEW_ATTN skeleton from FastVideo's contributor guide: a backend whose
# --- forward calls SDPA, written only against the contract (no attnrt capability data).
@dataclass
class MyNewAttnMetadata(AttentionMetadata):
    window_size: int = -1


class MyNewAttnImpl(AttentionImpl):
    calls = 0
    seen_metadata: list = []

    def __init__(self, num_heads, head_size, softmax_scale, causal=False, num_kv_heads=None,
                 prefix="", **extra_impl_args):
        self.softmax_scale = softmax_scale
        self.causal = causal

    def forward(self, query, key, value, attn_metadata):
        MyNewAttnImpl.calls += 1
        MyNewAttnImpl.seen_metadata.append(attn_metadata)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                             scale=self.softmax_scale)
        return out.transpose(1, 2)


class MyNewAttnBackend(AttentionBackend):
    accept_output_buffer = True

    @staticmethod
    def get_name():
        return "MY_NEW_ATTN"

    @staticmethod
    def get_impl_cls():
        return MyNewAttnImpl

    @staticmethod
    def get_metadata_cls():
        return MyNewAttnMetadata

    @staticmethod
    def get_supported_head_sizes():
        return [64, 128]


def test_my_new_attn_plugs_in_by_registration_alone(register):
    register("MY_NEW_ATTN", MyNewAttnBackend)
    MyNewAttnImpl.calls = 0
    layer = attnrt.LocalAttention(4, 64, supported_attention_backends=("MY_NEW_ATTN",))
    assert layer.backend_name == "MY_NEW_ATTN"
    decision = attnrt.explain(head_size=64, dtype="fp32", num_heads=4, allowed=("MY_NEW_ATTN",))
    assert decision.backend == "MY_NEW_ATTN"
    assert "MY_NEW_ATTN" in decision.explain()
    q, k, v = randn_qkv(2, 33, 4, 64)
    out = layer(q, k, v)
    assert MyNewAttnImpl.calls == 1
    assert rel_l2(out, dense_reference(q, k, v)) < TOLERANCE[torch.float32]


def test_fastvideo_head_size_list_is_read_as_capability(register):
    register("MY_NEW_ATTN", MyNewAttnBackend)
    decision = attnrt.explain(head_size=80, dtype="fp32", allowed=("MY_NEW_ATTN", "REFERENCE"))
    assert decision.backend == "REFERENCE"
    refusal = {c.name: c for c in decision.candidates}["MY_NEW_ATTN"]
    assert [r.code for r in refusal.reasons] == ["HEAD_SIZE"]
    assert "head_size=80" in refusal.reasons[0].message
    assert "64, 128" in refusal.reasons[0].message


def test_forced_by_fastvideo_env_name(register, monkeypatch):
    register("MY_NEW_ATTN", MyNewAttnBackend)
    monkeypatch.setenv("FASTVIDEO_ATTENTION_BACKEND", "MY_NEW_ATTN")
    decision = attnrt.select(attnrt.AttentionRequest(64, "fp32"))
    assert decision.backend == "MY_NEW_ATTN"
    assert decision.forced == "FASTVIDEO_ATTENTION_BACKEND=MY_NEW_ATTN"


def test_lazy_string_registration_loads_on_first_use(register):
    register("MY_NEW_ATTN", f"{__name__}:MyNewAttnBackend")
    assert registry.load("MY_NEW_ATTN") is MyNewAttnBackend


class TestRegistrationFailures:
    def test_name_clash_is_refused(self, register):
        register("MY_NEW_ATTN", MyNewAttnBackend)
        with pytest.raises(attnrt.RegistryError, match="MY_NEW_ATTN is already registered"):
            attnrt.register_backend("MY_NEW_ATTN", "somewhere.else:Other")

    def test_builtin_name_clash_is_refused(self):
        with pytest.raises(attnrt.RegistryError, match="TORCH_SDPA is already registered"):
            attnrt.register_backend("TORCH_SDPA", MyNewAttnBackend)

    def test_name_must_be_upper_snake(self):
        with pytest.raises(attnrt.RegistryError, match="UPPER_SNAKE_CASE"):
            attnrt.register_backend("my_new_attn", "x:Y")

    def test_get_name_must_match(self):
        with pytest.raises(attnrt.RegistryError, match="get_name\\(\\) returns 'MY_NEW_ATTN'"):
            attnrt.register_backend("OTHER_NAME", MyNewAttnBackend)

    def test_missing_contract_methods_are_named(self):
        class NoImpl:
            @staticmethod
            def get_name():
                return "NO_IMPL"

        with pytest.raises(attnrt.RegistryError, match="lacks get_impl_cls"):
            attnrt.register_backend("NO_IMPL", NoImpl)

    def test_impl_without_forward_is_refused(self):
        class BadImplBackend:
            @staticmethod
            def get_name():
                return "BAD_IMPL"

            @staticmethod
            def get_impl_cls():
                return int

        with pytest.raises(attnrt.RegistryError, match="forward"):
            attnrt.register_backend("BAD_IMPL", BadImplBackend)

    def test_unloadable_target_is_a_reason_not_a_crash(self, register):
        register("GHOST_ATTN", "no_such_module_anywhere:Ghost")
        decision = attnrt.explain(head_size=64, dtype="fp32", allowed=("GHOST_ATTN", "REFERENCE"))
        assert decision.backend == "REFERENCE"
        ghost = {c.name: c for c in decision.candidates}["GHOST_ATTN"]
        assert ghost.reasons[0].code == "NOT_REGISTERED"
        assert "no_such_module_anywhere" in ghost.reasons[0].message


def test_entry_point_group_registers_backends(monkeypatch):
    ep = importlib.metadata.EntryPoint("MY_NEW_ATTN", f"{__name__}:MyNewAttnBackend",
                                       registry.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points

    def fake_entry_points(**kw):
        return [ep] if kw.get("group") == registry.ENTRY_POINT_GROUP else real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    registry.clear_registry_cache()
    try:
        assert "MY_NEW_ATTN" in registry.names()
        assert registry.spec("MY_NEW_ATTN").origin.startswith("entry point")
        assert registry.load("MY_NEW_ATTN") is MyNewAttnBackend
    finally:
        registry.unregister_backend("MY_NEW_ATTN")


def test_metadata_asdict_zerocopy_keeps_tensors_and_skips_fields():
    t = torch.randn(3)
    meta = MyNewAttnMetadata(current_timestep=5, window_size=7)
    meta.extra_tensor = t  # not a field: not included
    d = meta.asdict_zerocopy(skip_fields={"window_size"})
    assert d == {"current_timestep": 5}
    holder = MyNewAttnMetadata(current_timestep=1)
    assert holder.asdict_zerocopy()["window_size"] == -1


def test_forward_context_reaches_the_backend(register):
    register("MY_NEW_ATTN", MyNewAttnBackend)
    MyNewAttnImpl.seen_metadata = []
    layer = attnrt.LocalAttention(2, 64, supported_attention_backends=("MY_NEW_ATTN",))
    q, k, v = randn_qkv(1, 8, 2, 64)
    meta = MyNewAttnMetadata(current_timestep=3)
    with attnrt.set_forward_context(current_timestep=3, attn_metadata=meta):
        layer(q, k, v)
    layer(q, k, v)
    assert MyNewAttnImpl.seen_metadata == [meta, None]


CAPABILITY_DEFAULTS = {
    "PLATFORMS": None, "ARCHS": None, "DTYPES": frozenset({"fp16", "bf16", "fp32", "fp64"}),
    "HEAD_SIZES": None, "SUPPORTS_CAUSAL": True, "SUPPORTS_GQA": True, "PACKAGES": (),
    "SUPPORTS_REPLICATED_TOKENS": True, "ACCEPTS_GATE_COMPRESS": None,
}


def test_capability_defaults_live_on_attention_backend():
    from attnrt.selection.capability import declared

    class DeclaresNothing:  # FastVideo style: not even an AttentionBackend subclass
        @staticmethod
        def get_name() -> str:
            return "NOTHING"

    for attr, default in CAPABILITY_DEFAULTS.items():
        assert getattr(AttentionBackend, attr) == default
        assert declared(DeclaresNothing, attr) == default
    device = attnrt.Device("cpu", "x86_64")
    assert AttentionBackend.extra_reasons(attnrt.AttentionRequest(64, "fp32"), device) == []


def test_forward_with_lse_is_optional_and_declared_on_the_impl():
    from attnrt.interfaces import lse_forward

    impl = MyNewAttnImpl(2, 32, 32 ** -0.5)
    assert lse_forward(impl) is None
    with pytest.raises(NotImplementedError, match="MyNewAttnImpl does not define forward_with_lse"):
        impl.forward_with_lse(*randn_qkv(1, 8, 2, 32), None)

    class WithLse(MyNewAttnImpl):
        def forward_with_lse(self, query, key, value, attn_metadata):
            return query, query.new_zeros(query.shape[0], query.shape[2], query.shape[1])

    with_lse = WithLse(2, 32, 32 ** -0.5)
    assert lse_forward(with_lse) == with_lse.forward_with_lse
