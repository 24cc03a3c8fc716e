"""Backends of method `linear`: declared capability, the fla adapter's exact calls (through a
recording stand-in for the fla package), refusal when fla is absent, and the LocalAttention
impl."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from attnrt.engine import linear_backends as lb
from attnrt.engine.linear import LinearAttentionEngine, meta_tensor
from attnrt.errors import BackendUnavailableError
from attnrt.interfaces import AttentionMetadata
from attnrt.kernels.linear import LinearAttentionError
from attnrt.kernels.linear.reference import linear_attention_reference
from attnrt.selection import capability as support
from attnrt.selection.device import parse_device_spec
from attnrt.selection.request import AttentionRequest
from tests.linear.cases import elu1, log, rel_l2

B, N, H, D = 1, 12, 2, 16
ALL = (lb.TritonLinearAttnBackend, lb.FlaLinearAttnBackend, lb.ReferenceLinearAttnBackend)


def test_backends_declare_method_linear_and_stable_names() -> None:
    assert [b.get_name() for b in ALL] == ["TRITON_LINEAR_ATTN", "FLA_LINEAR_ATTN",
                                           "REFERENCE_LINEAR_ATTN"]
    for backend in ALL:
        assert frozenset({"linear"}) == backend.METHODS
        assert backend.SUPPORTS_GQA is False


def test_capability_check_reasons_on_a_simulated_h100(local_packages) -> None:
    device = parse_device_spec("cuda:sm90")
    request = AttentionRequest(128, "bf16", 16, 16, True, method="linear")
    assert support.check(lb.ReferenceLinearAttnBackend, request, device) == []
    fla = support.check(lb.FlaLinearAttnBackend, request, device)
    if "fla" not in sys.modules:
        assert [r.code for r in fla] == [support.PACKAGE_MISSING]
        assert "import fla.ops failed" in fla[0].message
        assert "pip install fla-core" in fla[0].hint
    old = parse_device_spec("cuda:sm75")
    codes = [r.code for r in support.check(lb.TritonLinearAttnBackend, request, old)]
    assert support.ARCH in codes
    gqa = AttentionRequest(128, "bf16", 16, 4, True, method="linear")
    codes = [r.code for r in support.check(lb.ReferenceLinearAttnBackend, gqa, device)]
    assert codes == [support.GQA]


class _Recorder:
    """A stand-in fla: each chunk_* records its call and answers with the reference."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def function(self, name: str):
        def run(q, k, v, g=None, **kwargs):
            self.calls.append((name, (q, k, v, g), kwargs))
            scale = kwargs["scale"]
            o, ht = linear_attention_reference(q * scale, k, v, g,
                                               initial_state=kwargs["initial_state"],
                                               output_final_state=True)
            return o, ht
        return run


@pytest.fixture
def fake_fla(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    recorder = _Recorder()
    for module_name, attr in (("fla.ops.linear_attn", "chunk_linear_attn"),
                              ("fla.ops.simple_gla", "chunk_simple_gla"),
                              ("fla.ops.gla", "chunk_gla")):
        module = types.ModuleType(module_name)
        setattr(module, attr, recorder.function(attr))
        monkeypatch.setitem(sys.modules, module_name, module)
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setitem(sys.modules, "fla.ops", types.ModuleType("fla.ops"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the adapter's device check admits CPU
    lb.clear_fla_cache()
    support.package_status.cache_clear()
    yield recorder
    lb.clear_fla_cache()
    support.package_status.cache_clear()


@pytest.mark.parametrize(("decay", "function"), [
    ("none", "chunk_linear_attn"), ("head", "chunk_simple_gla"),
    ("token", "chunk_simple_gla"), ("channel", "chunk_gla")])
def test_fla_adapter_calls(fake_fla: _Recorder, decay: str, function: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, generator=gen) for _ in range(3))
    decays = {"none": None, "head": torch.full((H,), 0.9),
              "token": torch.rand(B, N, H, generator=gen) * 0.5 + 0.5,
              "channel": torch.rand(B, N, H, D, generator=gen) * 0.5 + 0.5}
    meta = tuple(meta_tensor(*t.shape, dtype=torch.float32) for t in (q, k, v))
    mod = LinearAttentionEngine(meta, k_mod=elu1, decay_mod=log, backend="fla")
    h0 = torch.randn(B, H, D, D, generator=gen)
    out, state = mod(q, k, v, decays[decay], initial_state=h0, output_final_state=True)
    [(name, (cq, ck, cv, cg), kwargs)] = fake_fla.calls
    assert name == function
    assert cq is q  # no q_mod: passed through unchanged
    assert torch.equal(ck, elu1(k, None))
    assert cv is v
    extra = {"normalize": False} if decay == "none" else {}
    assert kwargs == {"scale": 1.0, "initial_state": h0, "output_final_state": True, **extra}
    if decay == "none":
        assert cg is None
    else:
        want_g = decays[decay].log().expand(B, N, H) if decay == "head" else decays[decay].log()
        assert cg.dtype == torch.float32
        assert torch.equal(cg, want_g)
    ref = LinearAttentionEngine(meta, k_mod=elu1, decay_mod=log, backend="reference")
    want, want_state = ref(q, k, v, decays[decay], initial_state=h0, output_final_state=True)
    assert rel_l2(out, want) < 1e-6
    assert rel_l2(state, want_state) < 1e-6


def test_fla_absent_is_refused_with_reason_and_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fla.ops.linear_attn", None)  # import fails
    lb.clear_fla_cache()
    try:
        reason = lb.fla_functions()
        assert isinstance(reason, str)
        assert reason.startswith("import fla.ops.linear_attn failed")
        with pytest.raises(BackendUnavailableError, match="pip install fla-core"):
            lb.run_fla(*(torch.zeros(1, 1, 1, 16) for _ in range(3)), None, None, False)
    finally:
        lb.clear_fla_cache()


def _impl(backend=lb.ReferenceLinearAttnBackend, **extra):
    return backend.get_impl_cls()(H, D, 0.25, causal=True, **extra)


def test_local_attention_impl_runs_the_engine_with_scale_and_metadata_decay() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, N, H, D, generator=gen) for _ in range(3))
    gates = F.logsigmoid(torch.randn(B, N, H, D, generator=gen))
    impl = _impl(q_mod=elu1, k_mod=elu1)
    meta = AttentionMetadata()
    meta.linear_decay = gates  # type: ignore[attr-defined]
    out = impl.forward(q, k, v, meta)
    want, _ = linear_attention_reference(elu1(q, None) * 0.25, elu1(k, None), v, gates)
    assert rel_l2(out, want) < 1e-6
    assert type(impl).RUN == "reference"
    assert lb.TritonLinearAttnBackend.get_impl_cls().RUN == "triton"


def test_local_attention_impl_refusals() -> None:
    with pytest.raises(LinearAttentionError, match=r"extra_impl_args \['window'\]"):
        _impl(window=3)
    with pytest.raises(LinearAttentionError, match="num_kv_heads=1"):
        lb.ReferenceLinearAttnBackend.get_impl_cls()(H, D, 1.0, True, num_kv_heads=1)
    impl = _impl(decay=torch.full((H,), -0.1))
    meta = AttentionMetadata()
    meta.linear_decay = torch.full((H,), -0.1)  # type: ignore[attr-defined]
    q = torch.randn(B, N, H, D)
    with pytest.raises(LinearAttentionError, match="both given"):
        impl.forward(q, q, q, meta)


def test_linear_modules_import_without_triton() -> None:
    import subprocess

    code = ("import sys, attnrt.engine.linear, attnrt.engine.linear_backends, "
            "attnrt.engine.linear_impl, attnrt.kernels.linear; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'fla' not in sys.modules, 'fla imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_local_attention_runs_the_linear_impl_end_to_end() -> None:
    """q_mod/k_mod make the layer's method linear; the shipped rules serve it on cpu with the
    reference, the layer's extra args reach the impl, and explain names the method."""
    import attnrt

    decay = torch.full((H,), -0.1)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, N, H, D, generator=gen) for _ in range(3))
    layer = attnrt.LocalAttention(H, D, causal=True, softmax_scale=0.25, q_mod=elu1,
                                  k_mod=elu1, decay=decay)
    out = layer(q, k, v)
    assert layer.decision.request.method == "linear"
    assert layer.backend_name == "REFERENCE_LINEAR_ATTN"
    want, _ = linear_attention_reference(elu1(q, None) * 0.25, elu1(k, None), v,
                                         decay.expand(B, N, H))
    assert rel_l2(out, want) < 1e-6


@pytest.mark.gpu
def test_local_attention_triton_linear_impl_on_gpu() -> None:
    import attnrt
    from attnrt.selection.dispatch import force_backend

    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 200, 4, 64, generator=gen).to("cuda", torch.bfloat16)
               for _ in range(3))
    gates = F.logsigmoid(torch.randn(2, 200, 4, generator=gen) + 3).cuda()
    meta = AttentionMetadata()
    meta.linear_decay = gates  # type: ignore[attr-defined]
    with force_backend("TRITON_LINEAR_ATTN"), attnrt.set_forward_context(0, meta):
        layer = attnrt.LocalAttention(4, 64, causal=True, q_mod=elu1, k_mod=elu1)
        out = layer(q, k, v)
    want, _ = linear_attention_reference(elu1(q.double(), None) * 64 ** -0.5,
                                         elu1(k.double(), None), v.double(), gates.double())
    assert rel_l2(out, want) < 1.5e-2
