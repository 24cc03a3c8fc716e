"""MPS pack: probe parsing, the macOS dtype rules, SDPA_CHUNKED parity, chunking and peak memory.

No Mac here: the probe runs against monkeypatched torch.backends.mps / platform.mac_ver, the dtype
rules against simulated devices, and SDPA_CHUNKED (portable torch) on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnrt
from attnrt.backends.sdpa import sdpa_bnhd
from attnrt.platforms.mps import probe as mps_probe
from attnrt.platforms.mps import sdpa_chunked
from attnrt.platforms.mps.sdpa_chunked import SdpaChunkedBackend, chunk_rows, chunked_sdpa
from attnrt.selection import capability as support
from attnrt.selection.device import Device, PlatformUnavailable, probe_platform
from attnrt.selection.dispatch import decide, reasons_for
from attnrt.selection.manifest import shipped_path
from attnrt.selection.request import AttentionRequest
from tests.conftest import rel_l2
from tests.helpers import dense_reference

RULES = shipped_path()  # the rules under test are the shipped ones
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float64: 1e-12}





def qkv(n: int, m: int, h: int, hkv: int, d: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(7 * n + m)
    return (torch.randn(2, n, h, d, generator=gen).to(dtype),
            torch.randn(2, m, hkv, d, generator=gen).to(dtype),
            torch.randn(2, m, hkv, d, generator=gen).to(dtype))


def mac(version: str | None, simulated: bool = True) -> Device:
    versions = (("macos", version),) if version is not None else ()
    return Device("mps", "apple", name="Apple arm64", versions=versions, simulated=simulated)


# ---------------------------------------------------------------- probe


@pytest.mark.parametrize(("raw", "parsed"), [
    ("14.2.1", "14.2.1"), ("15.0", "15.0"), ("13.6", "13.6"), ("", "unknown"),
    ("not-a-version", "unknown"), ("14.0+local", "unknown"),
])
def test_mac_versions_parse(raw: str, parsed: str) -> None:
    assert mps_probe.parse_mac_version(raw) == parsed


def test_probe_on_a_build_without_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    with pytest.raises(PlatformUnavailable, match="built without MPS"):
        mps_probe.probe()


def test_probe_without_an_mps_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(PlatformUnavailable, match="is_available"):
        mps_probe.probe()


def test_probe_records_the_macos_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(mps_probe.host, "mac_ver", lambda: ("13.6.1", ("", "", ""), "arm64"))
    monkeypatch.setattr(mps_probe.host, "machine", lambda: "arm64")
    device = mps_probe.probe()
    assert (device.platform, device.arch, device.name) == ("mps", "apple", "Apple arm64")
    assert dict(device.versions)["macos"] == "13.6.1"
    assert str(mps_probe.macos_version(device)) == "13.6.1"


def test_probe_never_crashes_on_this_machine() -> None:
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(PlatformUnavailable):
        probe_platform("mps")


# ---------------------------------------------------------------- dtype rules (refusals)


def test_bf16_before_macos_14_is_refused_with_the_version() -> None:
    reasons = reasons_for("SDPA_CHUNKED", AttentionRequest(64, "bf16", 8), mac("13.6"))
    assert [r.code for r in reasons] == [support.DTYPE]
    assert "macOS 13.6" in reasons[0].message
    assert "macOS 14.0 or newer" in reasons[0].message
    assert "Sonoma" in reasons[0].hint


@pytest.mark.parametrize("version", ["14.0", "14.2.1", "15.1"])
def test_bf16_from_macos_14_is_accepted(version: str) -> None:
    assert reasons_for("SDPA_CHUNKED", AttentionRequest(64, "bf16", 8), mac(version)) == []


def test_bf16_with_an_unknown_macos_on_real_hardware_is_refused() -> None:
    reasons = reasons_for("SDPA_CHUNKED", AttentionRequest(64, "bf16", 8),
                          mac("unknown", simulated=False))
    assert [r.code for r in reasons] == [support.DTYPE]
    assert "unknown macOS version" in reasons[0].message


def test_a_simulated_mac_without_a_version_is_taken_as_current() -> None:
    assert reasons_for("SDPA_CHUNKED", AttentionRequest(64, "bf16", 8), mac(None)) == []


def test_fp64_is_refused_on_mps_but_not_on_cpu() -> None:
    reasons = reasons_for("SDPA_CHUNKED", AttentionRequest(64, "fp64", 8), mac("15.0"))
    assert [r.code for r in reasons] == [support.DTYPE]
    assert "dtype=fp64" in reasons[0].message
    assert "float64" in reasons[0].message
    cpu = Device("cpu", "x86_64", simulated=True)
    assert reasons_for("SDPA_CHUNKED", AttentionRequest(64, "fp64", 8), cpu) == []


def test_sdpa_chunked_is_refused_off_mps_and_cpu() -> None:
    reasons = reasons_for("SDPA_CHUNKED", AttentionRequest(64, "fp16", 8),
                          Device("cuda", "sm90", simulated=True))
    assert [r.code for r in reasons] == [support.PLATFORM]


# ---------------------------------------------------------------- selection


def test_mps_selection_prefers_sdpa_chunked_under_the_proposed_rule() -> None:
    decision = decide(AttentionRequest(128, "bf16", 24), mac("14.2"))
    assert decision.backend == "SDPA_CHUNKED"
    assert decision.rule is not None
    assert decision.rule.file == RULES
    assert decision.rule.provenance.startswith("source: ")


def test_mps_bf16_on_macos_13_skips_sdpa_chunked_with_its_reason() -> None:
    decision = decide(AttentionRequest(128, "bf16", 24), mac("13.5"))
    first = decision.candidates[0]
    assert first.name == "SDPA_CHUNKED"
    assert not first.ok
    assert "macOS 13.5" in first.verdict()
    assert decision.backend != "SDPA_CHUNKED"


def test_layer_runs_sdpa_chunked_on_cpu_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNRT_BACKEND", "SDPA_CHUNKED")
    calls = _count_sdpa(monkeypatch)
    layer = attnrt.LocalAttention(4, 32, num_kv_heads=2, causal=True, chunk_bytes=4096)
    q, k, v = qkv(40, 40, 4, 2, 32)
    out = layer(q, k, v)
    assert layer.backend_name == "SDPA_CHUNKED"
    assert calls["n"] == math.ceil(40 / chunk_rows(2, 4, 40, 4, 4096)) > 1
    assert rel_l2(out, dense_reference(q, k, v, True, 32 ** -0.5)) < TOL[torch.float32]


# ---------------------------------------------------------------- parity and chunking


def _count_sdpa(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"n": 0}

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        return sdpa_bnhd(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sdpa_chunked, "sdpa_bnhd", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(("n", "m", "hkv", "causal"), [
    (67, 67, 4, True), (45, 80, 2, True), (80, 45, 1, True), (53, 29, 4, False)],
    ids=["square-causal", "n<m-causal-gqa", "n>m-causal-mqa", "n>m"])
def test_chunked_sdpa_matches_float64_reference(monkeypatch: pytest.MonkeyPatch,
                                               dtype: torch.dtype, n: int, m: int, hkv: int,
                                               causal: bool) -> None:
    calls = _count_sdpa(monkeypatch)
    q, k, v = qkv(n, m, 4, hkv, 32, dtype)
    chunk_bytes = 2 * 4 * m * 4 * 16  # 16 rows per chunk
    out = chunked_sdpa(q, k, v, causal, 0.21, chunk_bytes=chunk_bytes)
    first = max(0, n - m) if causal else 0
    assert calls["n"] == math.ceil((n - first) / 16) > 1
    assert out.dtype == dtype
    assert out.shape == q.shape
    assert rel_l2(out, dense_reference(q, k, v, causal, 0.21)) < TOL[dtype]


def test_rows_that_see_no_key_are_zero_and_never_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_sdpa(monkeypatch)
    q, k, v = qkv(30, 10, 2, 2, 16)
    out = chunked_sdpa(q, k, v, causal=True, softmax_scale=None, chunk_bytes=1 << 20)
    assert calls["n"] == 1
    assert torch.equal(out[:, :20], torch.zeros_like(out[:, :20]))
    assert rel_l2(out, dense_reference(q, k, v, True, 16 ** -0.5)) < TOL[torch.float32]


def test_one_chunk_is_exactly_plain_sdpa() -> None:
    q, k, v = qkv(33, 47, 4, 2, 64)
    assert torch.equal(chunked_sdpa(q, k, v, True, 0.3), sdpa_bnhd(q, k, v, True, 0.3))


def test_chunk_rows_respects_bytes_and_the_element_cap() -> None:
    assert chunk_rows(1, 8, 1024, 4, chunk_bytes=8 * 1024 * 4 * 100) == 100
    assert chunk_rows(1, 8, 1024, 2, chunk_bytes=8 * 1024 * 4 * 100) == 100  # scores are fp32
    assert chunk_rows(1, 1, 2**30, 4, chunk_bytes=1 << 60) == 1  # 2**31 elements cap
    assert chunk_rows(4, 64, 4096, 4, chunk_bytes=1) == 1


def test_a_bad_chunk_budget_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="chunk_bytes=0"):
        SdpaChunkedBackend.get_impl_cls()(4, 64, 0.125, chunk_bytes=0)


# ---------------------------------------------------------------- peak memory on CPU


def _peak_cpu_bytes(fn) -> int:  # noqa: ANN001 - a zero-argument callable
    """Peak of live CPU allocations while fn runs, from torch's CPU memory profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_peak_memory_is_bounded_by_the_chunk_not_by_n_squared() -> None:
    b, n, h, d = 1, 1024, 8, 64
    q, k, v = qkv(n, n, h, h, d)
    q, k, v = q[:b], k[:b], v[:b]
    chunk = 1 << 20
    with sdpa_kernel(SDPBackend.MATH):  # what MPS runs for N > 8: the [B, H, N, M] math path
        plain = _peak_cpu_bytes(lambda: sdpa_bnhd(q, k, v, False, None))
        chunked = _peak_cpu_bytes(lambda: chunked_sdpa(q, k, v, False, None, chunk))
    scores = b * h * n * n * 4
    assert plain >= scores  # the math path holds the full score matrix
    out_bytes = q.numel() * 4
    assert chunked <= 2 * out_bytes + 4 * chunk  # output, its chunks, scores and softmax of one
    assert chunked * 4 < plain


def test_pack_hook_applies_the_same_rules_to_any_backend_name() -> None:
    from attnrt.platforms.mps import platform_reasons

    reasons = platform_reasons(AttentionRequest(64, "bf16", 8), mac("13.0"), "TORCH_SDPA")
    assert [r.code for r in reasons] == [support.DTYPE]
    assert "TORCH_SDPA" in reasons[0].message
    assert platform_reasons(AttentionRequest(64, "bf16", 8), mac("14.0"), "TORCH_SDPA") == []


def test_core_check_applies_the_pack_limits_to_every_backend() -> None:
    """bf16 on macOS 13 is refused by TORCH_SDPA and REFERENCE too, through support.check."""
    decision = decide(AttentionRequest(64, "bf16", 8), mac("13.5"))
    verdicts = {c.name: c for c in decision.candidates}
    assert decision.backend is None
    for name in ("SDPA_CHUNKED", "TORCH_SDPA", "REFERENCE"):
        assert [r.code for r in verdicts[name].reasons] == [support.DTYPE], name
        assert "macOS 13.5" in verdicts[name].verdict()
    assert decide(AttentionRequest(64, "fp16", 8), mac("13.5")).backend is not None
