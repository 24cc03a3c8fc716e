"""Selection across simulated devices. Expected choices come from tests/fixtures/matrix_cases.yaml
(written by hand beside the fixture manifest), never re-derived here. Refusals for every declared
limit of every fake backend are generated from the declarations themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import attnrt
from attnrt.selection.capability import check
from attnrt.selection.device import parse_device_spec
from attnrt.selection.manifest import load_manifest
from attnrt.selection.request import AttentionRequest
from tests.helpers import make_backend

FIXTURES = Path(__file__).parent / "fixtures"
CASES = yaml.safe_load((FIXTURES / "matrix_cases.yaml").read_text())


@pytest.fixture
def fakes(register, monkeypatch):
    classes = {}
    for name, caps in CASES["backends"].items():
        declared = {k: frozenset(v) if k in ("PLATFORMS", "DTYPES") else
                    tuple(v) if k == "HEAD_SIZES" else v for k, v in caps.items()}
        classes[name] = register(name, make_backend(name, **declared))
    return classes


def _case_id(case: dict) -> str:
    kv = f"-kv{case['kv_heads']}" if "kv_heads" in case else ""
    causal = "-causal" if case.get("causal") else ""
    return f"{case['device']}-{case['dtype']}-h{case['head_size']}{kv}{causal}"


@pytest.mark.parametrize("case", CASES["cases"], ids=_case_id)
def test_selection_matrix(fakes, case):
    request = AttentionRequest(case["head_size"], case["dtype"], case.get("heads", 8),
                               case.get("kv_heads"), case.get("causal", False))
    manifest = load_manifest([str(FIXTURES / "matrix.yaml")])  # the fixture alone
    with attnrt.simulated_device(case["device"]):
        decision = attnrt.select(request, manifest=manifest)
    assert decision.backend == case["expect"], decision.explain()
    assert decision.device.simulated


def _limit_cases() -> list:
    """(backend, field, request that breaks exactly that field, reason code)."""
    cases = []
    for name, caps in CASES["backends"].items():
        ok_platform = caps["PLATFORMS"][0]
        arch = {"cuda": "sm100" if "ARCHS" in caps and "100" in str(caps["ARCHS"]) else "sm90",
                "rocm": "gfx942", "npu": "ascend910b"}[ok_platform]
        base = {"device": f"{ok_platform}:{arch}", "dtype": caps["DTYPES"][0],
                "head_size": caps.get("HEAD_SIZES", [128])[-1]}
        cases.append(pytest.param(name, {**base, "device": "cpu"}, "PLATFORM", "platform=cpu",
                                  id=f"{name}-platform"))
        cases.append(pytest.param(name, {**base, "dtype": "fp32"}, "DTYPE", "dtype=fp32",
                                  id=f"{name}-dtype"))
        if "HEAD_SIZES" in caps:
            cases.append(pytest.param(name, {**base, "head_size": 40}, "HEAD_SIZE",
                                      "head_size=40", id=f"{name}-head_size"))
        if "ARCHS" in caps:
            cases.append(pytest.param(name, {**base, "device": "cuda:sm80"}, "ARCH",
                                      "arch=sm80", id=f"{name}-arch"))
        if caps.get("SUPPORTS_GQA") is False:
            cases.append(pytest.param(name, {**base, "kv_heads": 2}, "GQA", "num_kv_heads=2",
                                      id=f"{name}-gqa"))
    return cases


@pytest.mark.parametrize(("name", "over", "code", "needle"), _limit_cases())
def test_every_declared_limit_is_refused_with_its_reason(fakes, name, over, code, needle):
    request = AttentionRequest(over["head_size"], over["dtype"], 8, over.get("kv_heads"))
    reasons = check(fakes[name], request, parse_device_spec(over["device"]))
    assert [r.code for r in reasons] == [code]
    assert needle in reasons[0].message
    assert name in reasons[0].message
    ok = AttentionRequest(over["head_size"], over["dtype"], 8) if code == "GQA" else None
    if ok is not None:
        assert check(fakes[name], ok, parse_device_spec(over["device"])) == []


def test_causal_refusal_names_the_limit(register):
    backend = register("NO_CAUSAL", make_backend("NO_CAUSAL", SUPPORTS_CAUSAL=False))
    reasons = check(backend, AttentionRequest(64, "fp16", causal=True), parse_device_spec("cpu"))
    assert [r.code for r in reasons] == ["CAUSAL"]
    assert "causal=True is not supported by NO_CAUSAL" in reasons[0].message


@pytest.mark.usefixtures("local_packages")
def test_package_version_window_refusals(register, monkeypatch):
    import sys
    import types

    from attnrt.selection.capability import Package, package_status

    fake = types.ModuleType("fake_vendor_attn")
    fake.__version__ = "1.9.0"
    monkeypatch.setitem(sys.modules, "fake_vendor_attn", fake)
    pkg = Package("fake_vendor_attn", min_version="2.5", below_version="3",
                  hint="pip install fake-vendor-attn>=2.5")
    backend = register("VENDOR_ATTN", make_backend("VENDOR_ATTN", PACKAGES=(pkg,)))
    reasons = check(backend, AttentionRequest(64, "fp16"), parse_device_spec("cpu"))
    assert [r.code for r in reasons] == ["VERSION_WINDOW"]
    assert reasons[0].message == "fake_vendor_attn 1.9.0 is outside the supported window >=2.5,<3"
    assert reasons[0].hint == "pip install fake-vendor-attn>=2.5"
    fake.__version__ = "2.7.1"
    package_status.cache_clear()
    assert check(backend, AttentionRequest(64, "fp16"), parse_device_spec("cpu")) == []
