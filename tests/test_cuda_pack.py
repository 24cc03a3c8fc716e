"""The cuda pack: selection on simulated sm80/sm90/sm100, every declared limit refused by name,
vendor adapters against their documented signatures, compile-error fallback, and GPU parity.

Vendor packages (flash_attn, flash_attn_interface, sageattention) are replaced by stand-in
modules in sys.modules whose functions bind their arguments to the documented signature, so an
adapter passing an argument the real function does not take fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
import types
from dataclasses import replace
from typing import Any

import pytest
import torch

import attnrt
from attnrt.errors import KernelCompileError
from attnrt.selection import capability as support
from attnrt.selection import registry
from attnrt.selection.device import parse_device_spec
from attnrt.selection.request import AttentionRequest
from tests.conftest import TOLERANCE, rel_l2
from tests.helpers import CountingImpl, dense_reference, make_backend, randn_qkv

# Package checks as on a machine with torch alone (simulated devices assume them otherwise).
pytestmark = pytest.mark.usefixtures("local_packages")

HAS_CUDA = torch.cuda.is_available()
# Built at import, before the fixture: their package checks are this machine's too.
SM = {a: replace(parse_device_spec(f"cuda:{a}"), packages_assumed=False)
      for a in ("sm75", "sm80", "sm86", "sm90", "sm100")}


def _check(name: str, request: AttentionRequest, arch: str = "sm90") -> list[support.Reason]:
    device = SM[arch] if arch in SM else parse_device_spec(arch)
    return support.check(registry.load(name), request, device)


# ---------------------------------------------------------------- selection


class TestSelection:
    @pytest.mark.parametrize("arch", ["sm80", "sm90", "sm100"])
    def test_cuda_rule_ranks_pack_backends_and_skips_missing_vendors(self, arch):
        decision = attnrt.explain(head_size=128, dtype="bf16", num_heads=24,
                                  device=f"cuda:{arch}")
        assert decision.rule is not None
        assert f"arch={arch}" in decision.rule.conditions()
        assert decision.backend in {"TORCH_SDPA", "TORCH_SDPA_CUDNN", "TORCH_SDPA_FLASH"}
        for cand in decision.candidates:
            if cand.name in {"FLASH_ATTN", "FLASH_ATTN_3"} and cand.reached:
                assert {r.code for r in cand.reasons} & {"PACKAGE_MISSING", "ARCH"}
        assert decision.rule.source or decision.rule.measured  # every cuda rule has provenance

    def test_sm90_tries_flash_attn3_first_and_says_how_to_install_it(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
        decision = attnrt.explain(head_size=128, dtype="bf16", num_heads=24, device="cuda:sm90")
        first = decision.candidates[0]
        assert first.name == "FLASH_ATTN_3"
        assert first.reasons[0].code == "PACKAGE_MISSING"
        assert "flash-attention/hopper" in first.reasons[0].hint
        assert decision.rule is not None
        assert decision.rule.measured is not None

    def test_sm90_head_size_72_ranks_the_triton_kernel_ahead_of_fa2(self):
        # Measured 2026-11-26 on H100 (bench/NOTES-cuda.md): 244-247 vs 223-228 TFLOP/s.
        rank = attnrt.explain(head_size=72, dtype="fp16", device="cuda:sm90").rule.rank
        assert rank.index("TRITON_FLASH_ATTN") < rank.index("TORCH_SDPA_FLASH")

    def test_sm100_never_offers_hopper_or_ampere_only_packages(self):
        decision = attnrt.explain(head_size=128, dtype="bf16", device="cuda:sm100")
        assert not {"FLASH_ATTN_3", "FLASH_ATTN"} & {c.name for c in decision.candidates}

    def test_fp32_on_cuda_goes_to_pytorch_dispatch(self):
        assert attnrt.explain(head_size=64, dtype="fp32", device="cuda:sm90").backend == \
            "TORCH_SDPA"

    def test_sage_is_never_ranked_by_the_shipped_manifest(self):
        from attnrt.selection.manifest import current_manifest

        assert all("SAGE_ATTN" not in rule.rank for rule in current_manifest().rules)


# ---------------------------------------------------------------- declared limits


def _req(d: int = 128, dtype: str = "bf16", h: int = 8, hkv: int | None = None,
         causal: bool = False) -> AttentionRequest:
    return AttentionRequest(d, dtype, h, hkv, causal)


LIMITS = [
    # (backend, request, arch, reason code, text the reason must contain)
    ("TORCH_SDPA_CUDNN", _req(), "sm75", "ARCH", "arch=sm75"),
    ("TORCH_SDPA_CUDNN", _req(dtype="fp32"), "sm90", "DTYPE", "dtype=fp32"),
    ("TORCH_SDPA_CUDNN", _req(d=264), "sm90", "HEAD_SIZE", "head_size=264"),
    ("TORCH_SDPA_CUDNN", _req(d=100), "sm90", "HEAD_SIZE", "head_size=100"),
    ("TORCH_SDPA_CUDNN", _req(d=192), "sm80", "HEAD_SIZE", "arch=sm80"),
    ("TORCH_SDPA_CUDNN", _req(), "rocm:gfx942", "PLATFORM", "platform=rocm"),
    ("TORCH_SDPA_FLASH", _req(), "sm75", "ARCH", "arch=sm75"),
    ("TORCH_SDPA_FLASH", _req(dtype="fp32"), "sm90", "DTYPE", "dtype=fp32"),
    ("TORCH_SDPA_FLASH", _req(d=264), "sm90", "HEAD_SIZE", "head_size=264"),
    ("TORCH_SDPA_EFFICIENT", _req(hkv=2), "sm90", "GQA", "num_kv_heads=2"),
    ("TORCH_SDPA_EFFICIENT", _req(dtype="bf16"), "sm75", "ARCH", "dtype=bf16"),
    ("TORCH_SDPA_EFFICIENT", _req(dtype="fp64"), "sm90", "DTYPE", "dtype=fp64"),
    ("TORCH_SDPA_EFFICIENT", _req(), "cuda:sm37", "ARCH", "arch=sm37"),
    ("FLASH_ATTN", _req(), "sm100", "ARCH", "arch=sm100"),
    ("FLASH_ATTN", _req(dtype="fp32"), "sm90", "DTYPE", "dtype=fp32"),
    ("FLASH_ATTN", _req(d=264), "sm90", "HEAD_SIZE", "head_size=264"),
    ("FLASH_ATTN", _req(), "mps", "PLATFORM", "platform=mps"),
    ("FLASH_ATTN_3", _req(), "sm80", "ARCH", "arch=sm80"),
    ("FLASH_ATTN_3", _req(d=72), "sm90", "HEAD_SIZE", "head_size=72"),
    ("FLASH_ATTN_3", _req(dtype="fp32"), "sm90", "DTYPE", "dtype=fp32"),
    ("SAGE_ATTN", _req(), "sm100", "ARCH", "arch=sm100"),
    ("SAGE_ATTN", _req(d=192), "sm90", "HEAD_SIZE", "head_size=192"),
    ("SAGE_ATTN", _req(dtype="fp32"), "sm90", "DTYPE", "dtype=fp32"),
    ("TRITON_FLASH_ATTN", _req(), "sm75", "ARCH", "arch=sm75"),
    ("TRITON_FLASH_ATTN", _req(d=24), "sm90", "HEAD_SIZE", "head_size=24"),
    ("TRITON_FLASH_ATTN", _req(d=260), "sm90", "HEAD_SIZE", "head_size=260"),
    ("TRITON_FLASH_ATTN", _req(dtype="fp64"), "sm90", "DTYPE", "dtype=fp64"),
    ("TRITON_FLASH_ATTN", _req(), "cpu", "PLATFORM", "platform=cpu"),
]


@pytest.mark.parametrize(("name", "request_", "arch", "code", "text"), LIMITS,
                         ids=[f"{n}-{c}-{t}" for n, _, _, c, t in LIMITS])
def test_each_declared_limit_is_refused_by_name(name, request_, arch, code, text):
    reasons = _check(name, request_, arch)
    hit = [r for r in reasons if r.code == code]
    assert hit, f"{name} did not refuse {request_.describe()} on {arch}: {reasons}"
    assert text in hit[0].message
    assert name in hit[0].message


@pytest.mark.parametrize("name", ["TORCH_SDPA_CUDNN", "TORCH_SDPA_FLASH", "TORCH_SDPA_EFFICIENT",
                                  "TRITON_FLASH_ATTN"])
def test_in_range_requests_are_accepted(name):
    request = _req(d=128, dtype="fp16", h=8, hkv=None if "EFFICIENT" in name else 2, causal=True)
    assert _check(name, request, "sm90") == []


# ---------------------------------------------------------------- vendor packages


VENDORS = {  # backend -> (module, function, documented signature, install hint fragment)
    "FLASH_ATTN": ("flash_attn", "flash_attn_func",
                   "q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, "
                   "window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, "
                   "return_attn_probs=False", "pip install flash-attn --no-build-isolation"),
    "FLASH_ATTN_3": ("flash_attn_interface", "flash_attn_func",
                     "q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, "
                     "k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, "
                     "softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, "
                     "sm_margin=0, return_attn_probs=False", "flash-attention/hopper"),
    "SAGE_ATTN": ("sageattention", "sageattn",
                  "q, k, v, tensor_layout='HND', is_causal=False, sm_scale=None, "
                  "return_lse=False", "pip install sageattention"),
}


def _signature(params: str) -> inspect.Signature:
    namespace: dict[str, Any] = {}
    exec(f"def f({params}): pass", namespace)  # noqa: S102 - builds the documented signature
    return inspect.signature(namespace["f"])


class Recorder:
    """A vendor function stand-in: binds each call to the documented signature and records it."""

    def __init__(self, params: str, returns_tuple: bool = False) -> None:
        self.signature, self.calls, self.returns_tuple = _signature(params), [], returns_tuple

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.signature.bind(*args, **kwargs)  # TypeError on any argument the real one lacks
        self.calls.append((args, kwargs))
        q, k, v = args[:3]
        layout_hnd = kwargs.get("tensor_layout") == "HND"
        assert not layout_hnd, "the adapter must pass [B, N, H, D] tensors as NHD"
        scale = kwargs.get("softmax_scale", kwargs.get("sm_scale"))
        causal = kwargs.get("causal", kwargs.get("is_causal", False))
        out = dense_reference(q, k, v, causal, scale).to(q.dtype)
        return (out, torch.zeros(1)) if self.returns_tuple else out


def _stand_in(monkeypatch, name: str, version: str | None = "2.6.3",
              returns_tuple: bool = False) -> Recorder:
    module_name, fn_name, params, _ = VENDORS[name]
    module = types.ModuleType(module_name)
    recorder = Recorder(params, returns_tuple)
    setattr(module, fn_name, recorder)
    if version is not None:
        module.__version__ = version
    monkeypatch.setitem(sys.modules, module_name, module)
    attnrt.clear_caches()
    return recorder


@pytest.mark.parametrize("name", sorted(VENDORS))
def test_vendor_absent_is_refused_with_install_hint(name, monkeypatch):
    module_name, _, _, hint = VENDORS[name]
    monkeypatch.setitem(sys.modules, module_name, None)  # import fails even if installed
    reasons = _check(name, _req(), "sm90")
    assert [r.code for r in reasons] == ["PACKAGE_MISSING"]
    assert f"import {module_name} failed" in reasons[0].message
    assert hint in reasons[0].hint


@pytest.mark.parametrize(("name", "version", "window"), [
    ("FLASH_ATTN", "2.3.6", ">=2.5,<3"), ("FLASH_ATTN", "3.0.0", ">=2.5,<3"),
    ("FLASH_ATTN_3", "2.7.0", ">=3.0.0b1,<4"), ("SAGE_ATTN", "1.0.5", ">=1.0.6,<3"),
    ("SAGE_ATTN", "3.0.0", ">=1.0.6,<3")])
def test_vendor_outside_version_window_is_refused(name, version, window, monkeypatch):
    _stand_in(monkeypatch, name, version)
    reasons = _check(name, _req(), "sm90")
    assert [r.code for r in reasons] == ["VERSION_WINDOW"]
    assert version in reasons[0].message
    assert window in reasons[0].message


def _impl(name: str, h: int, d: int, causal: bool, hkv: int, scale: float) -> Any:
    return registry.load(name).get_impl_cls()(h, d, scale, causal, hkv)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_adapter_call(causal, monkeypatch):
    rec = _stand_in(monkeypatch, "FLASH_ATTN", "2.7.4")
    assert _check("FLASH_ATTN", _req(d=64, hkv=2, causal=causal), "sm90") == []
    q, k, v = randn_qkv(2, 33, 8, 64, hkv=2, m=47, dtype=torch.float16)
    out = _impl("FLASH_ATTN", 8, 64, causal, 2, 0.2).forward(q, k, v, None)
    (args, kwargs), = rec.calls
    assert args[0] is q
    assert args[1] is k
    assert args[2] is v
    assert kwargs == {"dropout_p": 0.0, "softmax_scale": 0.2, "causal": causal}
    assert rel_l2(out, dense_reference(q, k, v, causal, 0.2)) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("returns_tuple", [False, True])
def test_flash_attn3_adapter_call_and_both_return_styles(returns_tuple, monkeypatch):
    rec = _stand_in(monkeypatch, "FLASH_ATTN_3", None, returns_tuple)
    assert _check("FLASH_ATTN_3", _req(d=64, causal=True), "sm90") == []
    q, k, v = randn_qkv(1, 40, 4, 64, dtype=torch.bfloat16)
    out = _impl("FLASH_ATTN_3", 4, 64, True, 4, 0.125).forward(q, k, v, None)
    (args, kwargs), = rec.calls
    assert args == (q, k, v)
    assert kwargs == {"softmax_scale": 0.125, "causal": True}
    assert out.shape == q.shape
    assert rel_l2(out, dense_reference(q, k, v, True, 0.125)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("causal", [False, True])
def test_sage_adapter_call(causal, monkeypatch):
    rec = _stand_in(monkeypatch, "SAGE_ATTN", "2.2.0")
    assert _check("SAGE_ATTN", _req(d=128, hkv=4, causal=causal), "sm90") == []
    q, k, v = randn_qkv(1, 64, 8, 128, hkv=4, dtype=torch.float16)
    out = _impl("SAGE_ATTN", 8, 128, causal, 4, 0.09).forward(q, k, v, None)
    (args, kwargs), = rec.calls
    assert args == (q, k, v)
    assert kwargs == {"tensor_layout": "NHD", "is_causal": causal, "sm_scale": 0.09}
    assert rel_l2(out, dense_reference(q, k, v, causal, 0.09)) < TOLERANCE[torch.float16]


SAGE_V1_PARAMS = "q, k, v, tensor_layout='HND', is_causal=False, sm_scale=None, smooth_k=True"


def _sage_v1_stand_in(monkeypatch) -> Recorder:
    module = types.ModuleType("sageattention")
    recorder = Recorder(SAGE_V1_PARAMS)
    module.sageattn = recorder  # type: ignore[attr-defined]
    module.__version__ = "1.0.6"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sageattention", module)
    attnrt.clear_caches()
    return recorder


def test_sage_1x_gets_keys_smoothed_by_the_adapter_and_the_callers_k_stays(monkeypatch):
    """1.x's smooth_k subtracts the key mean in place; the adapter passes a smoothed copy."""
    rec = _sage_v1_stand_in(monkeypatch)
    q, k, v = randn_qkv(1, 48, 4, 96, hkv=2, dtype=torch.float16)
    k = k + 3.0  # a large common key offset, what smoothing is for
    k_before = k.clone()
    out = _impl("SAGE_ATTN", 4, 96, False, 2, 0.1).forward(q, k, v, None)
    (args, kwargs), = rec.calls
    assert torch.equal(k, k_before)
    assert torch.allclose(args[1], k - k.mean(dim=1, keepdim=True))
    assert kwargs == {"tensor_layout": "NHD", "is_causal": False, "sm_scale": 0.1,
                      "smooth_k": False}
    # A per-row constant shift of the scores: softmax, hence attention, is unchanged.
    assert rel_l2(out, dense_reference(q, k, v, False, 0.1)) < TOLERANCE[torch.float16]


def test_sage_1x_head_sizes_are_refused_by_name(monkeypatch):
    _sage_v1_stand_in(monkeypatch)
    real_sm90 = dataclasses.replace(SM["sm90"], simulated=False)
    sage = registry.load("SAGE_ATTN")
    reasons = support.check(sage, _req(d=80), real_sm90)
    assert [r.code for r in reasons] == ["HEAD_SIZE"]
    assert "head_size=80" in reasons[0].message
    assert "sageattention 1.x" in reasons[0].message
    assert support.check(sage, _req(d=96), real_sm90) == []
    # Planning for another machine: the local package's version says nothing about it.
    assert support.check(sage, _req(d=80), SM["sm90"]) == []


def test_sage_refuses_causal_with_n_different_from_m_before_calling(monkeypatch):
    rec = _stand_in(monkeypatch, "SAGE_ATTN", "2.2.0")
    q, k, v = randn_qkv(1, 30, 4, 64, m=50, dtype=torch.float16)
    with pytest.raises(KernelCompileError, match="N=30 != M=50"):
        _impl("SAGE_ATTN", 4, 64, True, 4, 0.125).forward(q, k, v, None)
    assert rec.calls == []


# ---------------------------------------------------------------- pinned SDPA, compile errors


def test_pinned_sdpa_refusal_becomes_kernel_compile_error():
    # cuDNN attention has no CPU kernel: PyTorch's own refusal must surface as the typed error.
    q, k, v = randn_qkv(1, 16, 2, 64)
    with pytest.raises(KernelCompileError, match="TORCH_SDPA_CUDNN.*CUDNN_ATTENTION.*refused"):
        _impl("TORCH_SDPA_CUDNN", 2, 64, False, 2, 0.125).forward(q, k, v, None)


def test_pinned_sdpa_runs_the_pinned_kernel_bottom_right_causal():
    # PyTorch's flash kernel also exists on CPU, so the pinned path runs here for real.
    q, k, v = randn_qkv(1, 20, 2, 64, m=36)
    out = _impl("TORCH_SDPA_FLASH", 2, 64, True, 2, 0.125).forward(q, k, v, None)
    assert rel_l2(out, dense_reference(q, k, v, True, 0.125)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", ["TORCH_SDPA_FLASH", "TORCH_SDPA_EFFICIENT"])
def test_pinned_sdpa_causal_with_more_queries_than_keys(name, monkeypatch):
    # N > M: the first N - M rows see no key (zeros); the rest is square causal. Counted: the
    # pinned SDPA call sees only the last M query rows.
    import torch.nn.functional as F

    seen: list[int] = []
    real = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.shape[2])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = randn_qkv(1, 30, 2, 64, m=12)
    try:
        out = _impl(name, 2, 64, True, 2, 0.125).forward(q, k, v, None)
    except KernelCompileError:
        assert name == "TORCH_SDPA_EFFICIENT"  # no CPU kernel: the typed refusal is the result
        assert seen == [12]
        return
    assert seen == [12]
    assert torch.equal(out[:, :18], torch.zeros_like(out[:, :18]))
    assert rel_l2(out, dense_reference(q, k, v, True, 0.125)) < TOLERANCE[torch.float32]


def test_triton_compile_errors_become_kernel_compile_error(monkeypatch):
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    from attnrt.kernels.flash import launch as kernel

    def too_big(*args: Any, **kwargs: Any) -> None:
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(kernel, "flash_attention", too_big)
    q, k, v = randn_qkv(1, 8, 2, 64)
    with pytest.raises(KernelCompileError, match="TRITON_FLASH_ATTN failed to compile.*OutOf"):
        _impl("TRITON_FLASH_ATTN", 2, 64, False, 2, 0.125).forward(q, k, v, None)


def test_triton_runtime_errors_are_not_swallowed(monkeypatch):
    pytest.importorskip("triton")
    from attnrt.kernels.flash import launch as kernel

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(kernel, "flash_attention", crash)
    q, k, v = randn_qkv(1, 8, 2, 64)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _impl("TRITON_FLASH_ATTN", 2, 64, False, 2, 0.125).forward(q, k, v, None)


@pytest.mark.interpret
@pytest.mark.skipif(HAS_CUDA, reason="the interpreter case; the GPU runs the gpu cases")
def test_triton_backend_runs_the_kernel_under_the_interpreter():
    pytest.importorskip("triton")
    q, k, v = randn_qkv(1, 19, 4, 32, hkv=2, m=27)
    out = _impl("TRITON_FLASH_ATTN", 4, 32, True, 2, 0.2).forward(q, k, v, None)
    assert rel_l2(out, dense_reference(q, k, v, True, 0.2)) < TOLERANCE[torch.float32]


class _CompileFailImpl(CountingImpl):
    def forward(self, query, key, value, attn_metadata):
        type(self).backend.forward_calls += 1
        raise KernelCompileError("FAKE_COMPILE_FAIL: ptxas ran out of registers for D=64")


@pytest.fixture
def failing_first(register, write_yaml, monkeypatch):
    backend = make_backend("FAKE_COMPILE_FAIL", PLATFORMS=frozenset({"cpu"}))
    backend.get_impl_cls = classmethod(
        lambda cls: type("FailImpl", (_CompileFailImpl,), {"backend": cls}))
    register("FAKE_COMPILE_FAIL", backend)
    path = write_yaml("schema: 1\nrules:\n  - platform: cpu\n"
                      "    rank: [FAKE_COMPILE_FAIL, TORCH_SDPA, REFERENCE]\n")
    monkeypatch.setenv("ATTNRT_CAPABILITY", path)
    return backend


def test_compile_error_falls_to_next_ranked_backend_warning_once(failing_first, caplog):
    layer = attnrt.LocalAttention(4, 64)
    assert layer.backend_name == "FAKE_COMPILE_FAIL"
    q, k, v = randn_qkv(2, 24, 4, 64)
    with caplog.at_level(logging.WARNING, logger="attnrt"):
        out1 = layer(q, k, v)
        out2 = layer(q, k, v)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "FAKE_COMPILE_FAIL failed" in warned[0].getMessage()
    assert failing_first.forward_calls == 1
    assert layer.backend_name == "TORCH_SDPA"
    ref = dense_reference(q, k, v)
    assert rel_l2(out1, ref) < TOLERANCE[torch.float32]
    assert rel_l2(out2, ref) < 1e-5


def test_compile_error_raises_under_strict(failing_first, monkeypatch):
    monkeypatch.setenv("ATTNRT_STRICT", "1")
    layer = attnrt.LocalAttention(4, 64)
    q, k, v = randn_qkv(1, 8, 4, 64)
    with pytest.raises(KernelCompileError, match="ptxas"):
        layer(q, k, v)
    assert failing_first.forward_calls == 1


# ---------------------------------------------------------------- GPU parity


GPU_BACKENDS = ("TORCH_SDPA_CUDNN", "TORCH_SDPA_FLASH", "TORCH_SDPA_EFFICIENT", "TRITON_FLASH_ATTN")
# (N, M, H, Hkv, D): odd N, GQA, a non-power-of-two D, N != M.
GPU_SHAPES = ((257, 257, 4, 4, 64), (128, 128, 8, 2, 128), (99, 99, 4, 4, 72),
              (200, 328, 4, 4, 64), (328, 200, 4, 4, 192), (328, 200, 8, 2, 64))
GPU_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _gpu_cases() -> list:
    out = []
    for name in GPU_BACKENDS:
        for dt in GPU_DTYPES:
            for n, m, h, hkv, d in GPU_SHAPES:
                for causal in (False, True):
                    cid = f"{name}-cuda-{dt}-h{d}-n{n}-m{m}{'-gqa' if hkv != h else ''}" \
                          f"{'-causal' if causal else ''}"
                    out.append(pytest.param(name, dt, (n, m, h, hkv, d), causal, id=cid))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "dtype", "shape", "causal"), _gpu_cases())
def test_gpu_parity(name, dtype, shape, causal):
    n, m, h, hkv, d = shape
    device = attnrt.probe()
    reasons = support.check(registry.load(name), AttentionRequest(d, dtype, h, hkv, causal),
                            device)
    if reasons:  # a declared refusal is the tested result here: it must name what it refuses
        assert all(r.code in {"GQA", "HEAD_SIZE", "RUNTIME"} for r in reasons), reasons
        assert all(name in r.message for r in reasons), reasons
        return
    q, k, v = (t.cuda() for t in randn_qkv(2, n, h, d, hkv=hkv, m=m, dtype=GPU_DTYPES[dtype]))
    out = _impl(name, h, d, causal, hkv, d ** -0.5).forward(q, k, v, None)
    assert out.shape == q.shape
    assert out.dtype == q.dtype
    assert rel_l2(out, dense_reference(q, k, v, causal)) < TOLERANCE[GPU_DTYPES[dtype]]


@pytest.mark.gpu
def test_gpu_shipped_rules_pick_by_mode_and_length():
    """On an H100 the shipped sm90 rules give causal D=64 inference to TRITON_FLASH_ATTN up to
    N=5792 and to cuDNN beyond it and in training; the layer follows, right in every mode."""
    if attnrt.probe().arch != "sm90":
        pytest.skip(f"the split is measured for sm90; this GPU is {attnrt.probe().arch}")
    layer = attnrt.LocalAttention(2, 64, causal=True)
    # (N, autograd on, backend, the N its selection was made at: 1000 shares 4096's span; no
    # training rule tells lengths apart, so training requests carry none)
    for n, grad, want, decided_at in ((4096, False, "TRITON_FLASH_ATTN", 4096),
                                      (8192, False, "TORCH_SDPA_CUDNN", 8192),
                                      (4096, True, "TORCH_SDPA_CUDNN", None),
                                      (1000, False, "TRITON_FLASH_ATTN", 4096)):
        q, k, v = (t.cuda() for t in randn_qkv(1, n, 2, 64, dtype=torch.bfloat16))
        with torch.set_grad_enabled(grad):
            out = layer(q.requires_grad_(grad), k, v)
        assert layer.backend_name == want, (n, grad)
        assert layer.decision.request.seq_len == decided_at
        assert rel_l2(out.detach(), dense_reference(q.detach(), k, v, True)) < 1.5e-2


# SageAttention quantizes Q and K to int8 (and V to fp16/fp8): its documented accuracy is a
# cosine similarity near 99.9%, so it is held to a relative L2 bound of its own, not bf16's.
SAGE_TOLERANCE = 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize(("d", "hkv", "causal"), [(64, 8, False), (128, 2, True), (96, 8, False)])
def test_sage_for_real_where_the_package_is_installed(d, hkv, causal):
    """Runs the installed sageattention (the GPU check script carries the 1.0.6 wheel)."""
    status = support.package_status(registry.load("SAGE_ATTN").PACKAGES[0])
    if status.reason is not None:
        pytest.skip(f"sageattention not usable here: {status.reason.message}")
    q, k, v = (t.cuda() for t in randn_qkv(2, 512, 8, d, hkv=hkv, dtype=torch.bfloat16))
    k = k + 2.0  # a common key offset, as real keys have; the adapter's smoothing removes it
    k_before = k.clone()
    out = _impl("SAGE_ATTN", 8, d, causal, hkv, d ** -0.5).forward(q, k, v, None)
    assert torch.equal(k, k_before)
    assert out.shape == q.shape
    assert rel_l2(out, dense_reference(q, k, v, causal)) < SAGE_TOLERANCE
