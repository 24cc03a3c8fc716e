"""ROCm pack: probe parsing, AITER's call and refusals, Triton configs, selection.

No AMD GPU here: the probe runs against monkeypatched torch.version.hip / torch.cuda, AITER
against a recording stand-in module with the documented signature, selection against simulated
devices and the shipped rules.
"""

from __future__ import annotations

import json
import math
import sys
import types
from typing import Any

import pytest
import torch

import attnrt
from attnrt.kernels.flash import configs_rocm as cfgs
from attnrt.platforms.rocm import probe as rocm_probe
from attnrt.platforms.rocm.aiter import AiterFlashAttnBackend
from attnrt.selection import capability as support
from attnrt.selection.device import Device, PlatformUnavailable, probe_platform
from attnrt.selection.dispatch import decide, reasons_for
from attnrt.selection.manifest import shipped_path
from attnrt.selection.request import AttentionRequest
from tests.conftest import rel_l2
from tests.helpers import dense_reference

RULES = shipped_path()  # the rules under test are the shipped ones





def qkv(n: int, m: int, h: int, hkv: int, d: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(n * 1000 + m)
    return (torch.randn(2, n, h, d, generator=gen).to(dtype),
            torch.randn(2, m, hkv, d, generator=gen).to(dtype),
            torch.randn(2, m, hkv, d, generator=gen).to(dtype))


# ---------------------------------------------------------------- probe


@pytest.mark.parametrize(("raw", "arch"), [
    ("gfx942:sramecc+:xnack-", "gfx942"), ("gfx90a:sramecc+:xnack-", "gfx90a"),
    ("gfx950", "gfx950"), ("GFX1100", "gfx1100"), (" gfx942 ", "gfx942"),
])
def test_gcn_arch_names_parse(raw: str, arch: str) -> None:
    assert rocm_probe.parse_gcn_arch(raw) == arch


@pytest.mark.parametrize("raw", ["", "sm_90", "AMD Instinct MI300X", "gfx"])
def test_bad_gcn_arch_names_are_refused_by_name(raw: str) -> None:
    with pytest.raises(PlatformUnavailable, match="gcnArchName=") as info:
        rocm_probe.parse_gcn_arch(raw)
    assert repr(raw) in str(info.value)


def test_probe_says_a_cuda_or_cpu_build_is_not_rocm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(PlatformUnavailable, match="not a ROCm build"):
        rocm_probe.probe()


def _fake_hip(monkeypatch: pytest.MonkeyPatch, available: bool = True, arch: str = "gfx942",
              error: Exception | None = None) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def props(index: int) -> Any:
        if error is not None:
            raise error
        return types.SimpleNamespace(name="AMD Instinct MI300X", total_memory=192 << 30,
                                     gcnArchName=arch)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)


def test_probe_reads_the_gcn_arch_of_a_hip_build(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hip(monkeypatch, arch="gfx942:sramecc+:xnack-")
    device = rocm_probe.probe()
    assert (device.platform, device.arch, device.name) == ("rocm", "gfx942", "AMD Instinct MI300X")
    assert dict(device.versions)["hip"] == "6.2.41133"
    assert device.memory_bytes == 192 << 30
    assert not device.simulated


def test_probe_without_a_gpu_keeps_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hip(monkeypatch, available=False)
    with pytest.raises(PlatformUnavailable, match="is_available"):
        rocm_probe.probe()


def test_probe_turns_a_driver_error_into_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hip(monkeypatch, error=RuntimeError("hipErrorNoDevice"))
    with pytest.raises(PlatformUnavailable, match="hipErrorNoDevice"):
        rocm_probe.probe()


def test_probe_never_crashes_on_this_machine() -> None:
    if torch.version.hip is not None:
        pytest.skip("this is a ROCm build; the probe may answer")
    with pytest.raises(PlatformUnavailable):
        probe_platform("rocm")


# ---------------------------------------------------------------- AITER adapter


class FakeAiter(types.ModuleType):
    """Stand-in for `aiter` with flash_attn_func's documented signature; records each call."""

    def __init__(self, tuple_return: bool = False) -> None:
        super().__init__("aiter")
        self.calls: list[dict[str, Any]] = []
        self.tuple_return = tuple_return
        self.__version__ = "0.1.5"

        def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                            window_size=(-1, -1), bias=None, alibi_slopes=None,
                            deterministic=True, return_lse=False, return_attn_probs=False):
            self.calls.append({"q": q, "k": k, "v": v, "dropout_p": dropout_p,
                               "softmax_scale": softmax_scale, "causal": causal,
                               "window_size": window_size, "bias": bias,
                               "alibi_slopes": alibi_slopes, "return_lse": return_lse,
                               "return_attn_probs": return_attn_probs})
            scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
            out = dense_reference(q, k, v, causal, scale).to(q.dtype)
            return (out,) if self.tuple_return else out

        self.flash_attn_func = flash_attn_func


@pytest.fixture
def fake_aiter(monkeypatch: pytest.MonkeyPatch) -> FakeAiter:
    module = FakeAiter()
    monkeypatch.setitem(sys.modules, "aiter", module)
    attnrt.clear_caches()
    return module


@pytest.mark.parametrize("tuple_return", [False, True], ids=["tensor", "tuple"])
@pytest.mark.parametrize(("n", "m", "hkv", "causal"), [
    (33, 33, 4, True), (17, 40, 2, True), (40, 17, 1, True), (24, 31, 4, False)])
def test_aiter_call_is_the_documented_one(monkeypatch: pytest.MonkeyPatch, tuple_return: bool,
                                          n: int, m: int, hkv: int, causal: bool) -> None:
    module = FakeAiter(tuple_return)
    monkeypatch.setitem(sys.modules, "aiter", module)
    q, k, v = qkv(n, m, 4, hkv, 64)
    impl = AiterFlashAttnBackend.get_impl_cls()(4, 64, 0.17, causal, hkv)
    out = impl.forward(q, k, v, None)
    (call,) = module.calls
    assert call["q"] is q
    assert call["k"] is k
    assert call["v"] is v
    assert (call["dropout_p"], call["softmax_scale"], call["causal"]) == (0.0, 0.17, causal)
    assert call["window_size"] == (-1, -1)
    assert call["bias"] is None
    assert not call["return_lse"]
    assert out.shape == q.shape
    assert rel_l2(out, dense_reference(q, k, v, causal, 0.17)) < 1e-5


def test_aiter_is_chosen_on_gfx942_when_installed(fake_aiter: FakeAiter) -> None:
    decision = decide(AttentionRequest(128, "bf16", 16, 4, causal=True), _sim("gfx942"))
    assert decision.backend == "AITER"
    assert decision.rule is not None
    assert decision.rule.file == RULES
    assert decision.rule.provenance.startswith("source: ROCm/aiter README")


def test_aiter_refused_on_gfx90a_names_the_arch(fake_aiter: FakeAiter) -> None:
    reasons = reasons_for("AITER", AttentionRequest(128, "bf16", 8), _sim("gfx90a"))
    assert [r.code for r in reasons] == [support.ARCH]
    assert "arch=gfx90a" in reasons[0].message
    assert "gfx942" in reasons[0].message


@pytest.mark.parametrize(("request_", "code", "text"), [
    (AttentionRequest(128, "fp32", 8), support.DTYPE, "dtype=fp32"),
    (AttentionRequest(320, "bf16", 8), support.HEAD_SIZE, "head_size=320"),
])
def test_aiter_refuses_its_declared_limits(fake_aiter: FakeAiter, request_: AttentionRequest,
                                           code: str, text: str) -> None:
    reasons = reasons_for("AITER", request_, _sim("gfx942"))
    assert [r.code for r in reasons] == [code]
    assert text in reasons[0].message


def test_aiter_refused_off_rocm(fake_aiter: FakeAiter) -> None:
    reasons = reasons_for("AITER", AttentionRequest(128, "bf16", 8),
                          Device("cuda", "sm90", simulated=True))
    assert [r.code for r in reasons] == [support.PLATFORM]


def test_missing_aiter_is_refused_with_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiter", None)  # import aiter raises ImportError
    reasons = reasons_for("AITER", AttentionRequest(128, "bf16", 8), _sim("gfx942"))
    assert [r.code for r in reasons] == [support.PACKAGE_MISSING]
    assert "import aiter failed" in reasons[0].message
    assert "amd-aiter" in reasons[0].hint


def test_the_unrelated_pypi_aiter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    impostor = types.ModuleType("aiter")  # PyPI's async-iterator 'aiter': no flash_attn_func
    monkeypatch.setitem(sys.modules, "aiter", impostor)
    reasons = reasons_for("AITER", AttentionRequest(128, "bf16", 8), _sim("gfx942"))
    assert [r.code for r in reasons] == [support.PACKAGE_MISSING]
    assert "no flash_attn_func" in reasons[0].message
    assert "amd-aiter" in reasons[0].hint


# ---------------------------------------------------------------- selection without AITER


def _sim(arch: str) -> Device:
    return Device("rocm", arch, name="simulated", simulated=True)


@pytest.mark.parametrize(("arch", "first"), [("gfx942", "AITER"), ("gfx950", "AITER"),
                                             ("gfx90a", "FLASH_ATTN")])
def test_rocm_walk_follows_the_proposed_rule(monkeypatch: pytest.MonkeyPatch, arch: str,
                                             first: str) -> None:
    monkeypatch.setitem(sys.modules, "aiter", None)
    decision = decide(AttentionRequest(128, "bf16", 8), _sim(arch))
    assert decision.rule is not None
    assert decision.rule.file == RULES
    names = [c.name for c in decision.candidates]
    assert names == list(decision.rule.rank)
    assert names[0] == first
    assert not decision.candidates[0].ok  # AITER / flash_attn are not installed here
    chosen = next(c.name for c in decision.candidates if c.ok)
    assert decision.backend == chosen


def test_rocm_fp32_falls_to_the_catch_all_rocm_rule() -> None:
    decision = decide(AttentionRequest(128, "fp32", 8), _sim("gfx942"))
    assert decision.rule is not None
    assert decision.rule.file == RULES
    assert decision.rule.rank[0] == "TORCH_SDPA"
    assert decision.backend == "TORCH_SDPA"


def test_info_json_lists_rocm_backends_and_rule_provenance(
        capsys: pytest.CaptureFixture[str]) -> None:
    from attnrt.tools.cli import main

    assert main(["info", "--json", "--device", "rocm:gfx942"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"]["simulated"]
    assert info["device"]["arch"] == "gfx942"
    rows = {b["name"]: b for b in info["backends"]}
    assert {"AITER", "TORCH_SDPA", "FLASH_ATTN", "TRITON_FLASH_ATTN"} <= set(rows)
    assert rows["AITER"]["platforms"] == ["rocm"]
    assert "available" in rows["AITER"]
    rules = [r for r in info["rules"] if r["where"].startswith(RULES)]
    assert rules
    assert all(r["provenance"].startswith("source: ") for r in rules)


# ---------------------------------------------------------------- Triton block configs

_KEYS = {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
_LDS = {"gfx90a": 64 << 10, "gfx942": 64 << 10, "gfx950": 160 << 10, "default": 64 << 10}


@pytest.mark.parametrize("arch", sorted(cfgs.CONFIGS))
def test_every_config_is_well_formed_and_fits_lds(arch: str) -> None:
    for bucket, entry in cfgs.CONFIGS[arch].items():
        assert set(entry) == {"fwd", "bwd_dkdv", "bwd_dq"}
        for block in entry.values():
            assert set(block) == _KEYS
            assert all(v > 0 and v & (v - 1) == 0 for v in block.values())
        # The forward's K and V tiles, 16-bit, at the widest D of the bucket, fit the LDS.
        fwd = entry["fwd"]
        assert 2 * fwd["BLOCK_N"] * bucket * 2 <= _LDS[arch]


def test_select_config_falls_back_and_copies() -> None:
    assert cfgs.select_config("gfx1100", 64) == cfgs.select_config("default", 64)
    assert cfgs.select_config("gfx942", 128, sixteen_bit=False) == cfgs.select_config("x", 128)
    first = cfgs.select_config("gfx942", 80)  # bucket 128
    first["fwd"]["BLOCK_M"] = 1
    assert cfgs.select_config("gfx942", 80)["fwd"]["BLOCK_M"] == 128
    assert math.log2(cfgs.head_size_bucket(80)) == 7


def test_head_size_without_a_config_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="head_size=300"):
        cfgs.select_config("gfx942", 300)


def test_triton_backend_finds_the_rocm_configs() -> None:
    from attnrt.backends.triton_flash import block_config

    assert block_config("rocm", "gfx950", 256, True) == cfgs.select_config("gfx950", 256)


def _unique_configs() -> list[tuple[str, int, cfgs.Config]]:
    seen: dict[str, tuple[str, int, cfgs.Config]] = {}
    for arch, table in cfgs.CONFIGS.items():
        for bucket, entry in table.items():
            seen.setdefault(f"{bucket}-{entry}", (arch, bucket, entry))
    return list(seen.values())


@pytest.mark.interpret
@pytest.mark.parametrize(("arch", "bucket", "config"), _unique_configs(),
                         ids=[f"{a}-d{b}" for a, b, _ in _unique_configs()])
def test_every_rocm_config_runs_the_kernel_correctly(arch: str, bucket: int,
                                                     config: cfgs.Config) -> None:
    """Each distinct config, forward and backward, against float64 (Triton interpreter on CPU)."""
    from attnrt.kernels.flash.launch import flash_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device).requires_grad_() for t in qkv(40, 51, 2, 1, bucket, torch.float16))
    out = flash_attention(q, k, v, causal=True, softmax_scale=0.1, config=config)
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*leaves, causal=True, scale=0.1)
    ref.backward(grad.cpu().double())
    assert rel_l2(out.detach().cpu(), ref.detach()) < 3e-3
    for got, want in zip((q, k, v), leaves, strict=True):
        assert rel_l2(got.grad.cpu(), want.grad) < 1e-2
