"""Device probes, their order, simulated devices and the per-platform report."""

from __future__ import annotations

import pytest
import torch

import attnrt
from attnrt.selection import device as devmod
from attnrt.selection.device import PlatformUnavailable, parse_device_spec, probe_report


def test_cpu_machine_probes_cpu_and_keeps_every_other_reason():
    dev = attnrt.probe()
    assert dev.platform == "cpu"
    assert not dev.simulated
    report = {platform: (d, reason) for platform, d, reason in probe_report()}
    assert [p for p, _, _ in probe_report()] == ["rocm", "cuda", "npu", "mps", "cpu"]
    assert report["cpu"][0] == dev
    for platform in ("rocm", "cuda", "npu", "mps"):
        d, reason = report[platform]
        assert d is None
        assert reason


@pytest.mark.parametrize(("spec", "platform", "arch"), [
    ("cuda:sm90", "cuda", "sm90"), ("cuda:sm100", "cuda", "sm100"),
    ("rocm:gfx942", "rocm", "gfx942"), ("rocm:gfx90a", "rocm", "gfx90a"),
    ("npu:ascend910b", "npu", "ascend910b"), ("mps", "mps", "apple"),
    ("CPU:x86_64", "cpu", "x86_64"),
])
def test_simulated_specs(spec, platform, arch):
    dev = parse_device_spec(spec)
    assert (dev.platform, dev.arch, dev.simulated) == (platform, arch, True)
    assert dev.describe().endswith("(simulated)")


@pytest.mark.parametrize(("spec", "needle"), [
    ("tpu:v5", "unknown platform"), ("cuda:gfx942", "not a cuda arch"),
    ("rocm:sm90", "not a rocm arch"), ("npu:910b", "not a npu arch"),
])
def test_bad_specs_are_named(spec, needle):
    with pytest.raises(attnrt.DeviceSpecError, match=needle):
        parse_device_spec(spec)


def test_env_and_context_manager_simulate(monkeypatch):
    monkeypatch.setenv("ATTNRT_DEVICE", "cuda:sm80")
    assert attnrt.probe().arch == "sm80"
    with attnrt.simulated_device("rocm:gfx942") as dev:
        assert attnrt.probe() is dev
    assert attnrt.probe().arch == "sm80"


def test_explain_of_simulated_device_says_simulated():
    text = attnrt.explain(head_size=128, dtype="bf16", device="cuda:sm90").explain()
    assert "cuda:sm90 (simulated)" in text


def test_rocm_is_told_apart_before_cuda(monkeypatch):
    """A HIP build answers torch.cuda.is_available(): the ROCm probe must win and CUDA refuse."""

    class Props:
        name = "AMD Instinct MI300X"
        gcnArchName = "gfx942:sramecc+:xnack-"
        total_memory = 192 << 30

    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    devmod.clear_probe_cache()
    dev = attnrt.probe()
    assert (dev.platform, dev.arch, dev.name) == ("rocm", "gfx942", "AMD Instinct MI300X")
    with pytest.raises(PlatformUnavailable, match="ROCm build"):
        devmod.probe_platform("cuda")


def test_cuda_probe_reads_capability(monkeypatch):
    class Props:
        name = "NVIDIA H100 80GB HBM3"
        total_memory = 80 << 30

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    devmod.clear_probe_cache()
    dev = devmod.probe_platform("cuda")
    assert (dev.platform, dev.arch, dev.memory_bytes) == ("cuda", "sm90", 80 << 30)
    assert dict(dev.versions)["cuda"] == "13.0"


def test_broken_platform_is_a_reason_not_a_crash(monkeypatch):
    def broken():
        raise PlatformUnavailable("driver too old: 470 < 525")

    monkeypatch.setattr("attnrt.platforms.cuda.probe.probe", broken)
    devmod.clear_probe_cache()
    rows = {p: reason for p, _, reason in probe_report()}
    assert rows["cuda"] == "driver too old: 470 < 525"
    assert attnrt.probe().platform == "cpu"


def test_import_attnrt_has_no_side_effects():
    """No env writes, no device init, no vendor or pack imports, nothing printed beyond torch's."""
    import subprocess
    import sys

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=False)

    torch_only = run("import torch")
    code = ("import os, sys; before = dict(os.environ); import torch; import attnrt; "
            "assert dict(os.environ) == before, 'env changed'; "
            "assert not torch.cuda.is_initialized(); "
            "assert 'attnrt.platforms.cuda.probe' not in sys.modules; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    out = run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert out.stderr == torch_only.stderr  # whatever torch itself warns, attnrt adds nothing


def test_a_failing_cuda_query_is_a_reason_not_a_crash(monkeypatch):
    def broken(*args):
        raise RuntimeError("Cannot re-initialize CUDA in forked subprocess")

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", broken)
    devmod.clear_probe_cache()
    rows = {p: reason for p, _, reason in probe_report()}
    assert rows["cuda"] == ("CUDA device query failed: Cannot re-initialize CUDA in forked "
                            "subprocess")
    assert attnrt.probe().platform == "cpu"
