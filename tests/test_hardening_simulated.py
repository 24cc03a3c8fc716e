"""Hardening (issue 18): a simulated device's plan does not depend on what is installed here.

TRITON_FLASH_ATTN used to be skipped on a simulated sm90 when triton was not installed locally,
so `attnrt explain --device cuda:sm90` answered for this machine, not for an H100. Now package
checks on a simulated device say "assumed installed" (ATTNRT_SIMULATED_PACKAGES=local checks
this machine's), and the output says so.
"""

from __future__ import annotations

import sys

import pytest

import attnrt
from attnrt.errors import AttnrtError
from attnrt.selection import capability, registry
from attnrt.selection.device import Device, parse_device_spec, simulated_device
from attnrt.selection.report import format_decision
from attnrt.selection.request import AttentionRequest
from attnrt.tools.cli import main

TRITON_ONLY = ("TRITON_FLASH_ATTN", "REFERENCE")


@pytest.fixture
def triton_missing(monkeypatch):
    """`import triton` fails here, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "triton", None)
    capability.package_status.cache_clear()
    yield
    capability.package_status.cache_clear()


def _request() -> AttentionRequest:
    return AttentionRequest(128, "bf16", 24, 24, False, allowed=TRITON_ONLY)


def test_simulated_plan_assumes_packages_installed(triton_missing):
    with simulated_device("cuda:sm90") as device:
        assert device.packages_assumed
        reasons = capability.check(registry.load("TRITON_FLASH_ATTN"), _request(), device)
        assert reasons == []
        decision = attnrt.explain(head_size=128, dtype="bf16", num_heads=24,
                                  allowed=TRITON_ONLY)
    assert decision.backend == "TRITON_FLASH_ATTN"
    text = format_decision(decision)
    assert "cuda:sm90 (simulated); packages assumed installed" in text
    assert "TRITON_FLASH_ATTN      ok  [assumes triton installed]" in text
    assert decision.device.to_dict()["packages"] == "assumed installed"


def test_local_packages_checks_this_machine(triton_missing, monkeypatch):
    monkeypatch.setenv("ATTNRT_SIMULATED_PACKAGES", "local")
    with simulated_device("cuda:sm90") as device:
        assert not device.packages_assumed
        reasons = capability.check(registry.load("TRITON_FLASH_ATTN"), _request(), device)
        decision = attnrt.explain(head_size=128, dtype="bf16", num_heads=24,
                                  allowed=TRITON_ONLY)
    assert [r.code for r in reasons] == [capability.PACKAGE_MISSING]
    assert decision.backend == "REFERENCE"
    assert "assumed" not in format_decision(decision)


def test_a_real_device_still_checks_packages(triton_missing):
    real = Device("cuda", "sm90", name="NVIDIA H100")
    reasons = capability.check(registry.load("TRITON_FLASH_ATTN"), _request(), real)
    assert [r.code for r in reasons] == [capability.PACKAGE_MISSING]


def test_explain_and_info_say_packages_are_assumed(triton_missing, capsys):
    assert main(["explain", "--device", "cuda:sm90", "--head-size", "128", "--dtype", "bf16",
                 "--backends", ",".join(TRITON_ONLY)]) == 0
    out = capsys.readouterr().out
    assert "chosen:   TRITON_FLASH_ATTN" in out
    assert "packages assumed installed" in out
    assert main(["info", "--device", "cuda:sm90"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "TRITON_FLASH_ATTN" in line]
    assert rows
    assert "available  (triton assumed installed)" in rows[0]


def test_simulated_rocm_assumes_amd_aiter(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiter", None)
    capability.package_status.cache_clear()
    with simulated_device("rocm:gfx942") as device:
        reasons = capability.check(registry.load("AITER"),
                                   AttentionRequest(128, "bf16", 8, 8, False), device)
    capability.package_status.cache_clear()
    assert reasons == []


def test_bad_simulated_packages_value_is_named(monkeypatch):
    monkeypatch.setenv("ATTNRT_SIMULATED_PACKAGES", "sometimes")
    with pytest.raises(AttnrtError, match=r"ATTNRT_SIMULATED_PACKAGES='sometimes'.*assumed"):
        parse_device_spec("cuda:sm90")
