"""A whole platform added from tests/fixtures/packs/fakeaccel without touching the core: it is
probed, simulated with ATTNRT_DEVICE, ranked by an override manifest, explained and run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import attnrt
from attnrt.errors import DeviceSpecError
from attnrt.selection import packs, registry
from attnrt.selection.device import parse_device_spec, probe_report
from attnrt.tools.cli import main
from tests.conftest import rel_l2
from tests.helpers import dense_reference, randn_qkv

PACKS = Path(__file__).parent / "fixtures" / "packs"
RULES = """
schema: 1
rules:
  - platform: fakeaccel
    arch: ">=fa3"
    rank: [FAKE_ATTN, TORCH_SDPA]
  - platform: fakeaccel
    rank: [TORCH_SDPA]
"""


@pytest.fixture
def fake_pack():
    """attnrt.platforms with the fixture folder on its path, as if the pack were installed."""
    import attnrt.platforms

    saved = list(attnrt.platforms.__path__)
    attnrt.platforms.__path__[:] = [*saved, str(PACKS)]
    attnrt.clear_caches()
    try:
        yield
    finally:
        attnrt.platforms.__path__[:] = saved
        for name in [m for m in sys.modules if m.startswith("attnrt.platforms.fakeaccel")]:
            del sys.modules[name]
        attnrt.clear_caches()


@pytest.fixture
def rules(write_yaml, monkeypatch):
    path = write_yaml(RULES, "fakeaccel.yaml")
    monkeypatch.setenv("ATTNRT_CAPABILITY", path)
    return path


def test_the_pack_is_listed_in_its_probe_order_with_its_backend(fake_pack):
    assert packs.names() == ("rocm", "cuda", "npu", "mps", "fakeaccel", "cpu")
    assert registry.spec("FAKE_ATTN").origin == "attnrt.platforms.fakeaccel"
    assert packs.for_torch_type("cpu") == ("fakeaccel", "cpu")


def test_without_the_pack_its_names_are_unknown():
    assert "fakeaccel" not in packs.names()
    assert not registry.is_registered("FAKE_ATTN")
    with pytest.raises(DeviceSpecError, match="unknown platform"):
        parse_device_spec("fakeaccel:fa3")


def test_probe_finds_the_device_where_it_answers(fake_pack, monkeypatch):
    report = {name: reason for name, _, reason in probe_report()}
    assert "FAKEACCEL_VISIBLE is not set" in report["fakeaccel"]
    assert attnrt.probe().platform == "cpu"
    monkeypatch.setenv("FAKEACCEL_VISIBLE", "fa3")
    attnrt.clear_caches()
    device = attnrt.probe()
    assert (device.platform, device.arch, device.simulated) == ("fakeaccel", "fa3", False)


def test_simulated_with_attnrt_device(fake_pack, monkeypatch):
    monkeypatch.setenv("ATTNRT_DEVICE", "fakeaccel")
    device = attnrt.probe()
    assert (device.platform, device.arch, device.simulated) == ("fakeaccel", "fa2", True)
    monkeypatch.setenv("ATTNRT_DEVICE", "fakeaccel:sm90")
    with pytest.raises(DeviceSpecError, match=r"not a fakeaccel arch; allowed pattern: fa\(\\d\)"):
        attnrt.probe()


def test_ranked_by_the_override_and_refused_below_its_arch(fake_pack, rules):
    on_fa3 = attnrt.explain(head_size=64, dtype="fp32", device="fakeaccel:fa3")
    assert on_fa3.backend == "FAKE_ATTN"
    assert on_fa3.rule is not None
    assert on_fa3.rule.where == f"{rules}:4"
    on_fa2 = attnrt.explain(head_size=64, dtype="fp32", device="fakeaccel:fa2")
    assert on_fa2.backend == "TORCH_SDPA"
    fp16 = attnrt.explain(head_size=64, dtype="fp16", device="fakeaccel:fa3")
    refused = {c.name: c.verdict() for c in fp16.candidates}
    assert "dtype=fp16 is not supported by FAKE_ATTN; supported: fp32" in refused["FAKE_ATTN"]
    # An arch range on the fake platform's own order: fa4 is >= fa3.
    assert attnrt.explain(head_size=64, dtype="fp32", device="fakeaccel:fa4").backend == \
        "FAKE_ATTN"


def test_explained_by_the_cli(fake_pack, rules, capsys):
    code = main(["explain", "--device", "fakeaccel:fa3", "--head-size", "64", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "FAKE_ATTN" in out
    assert "fakeaccel:fa3 (simulated)" in out
    assert "fakeaccel.yaml:4" in out


@pytest.mark.parametrize("how", ["simulated", "probed"])
def test_a_layer_runs_on_it(fake_pack, rules, monkeypatch, how):
    from attnrt.platforms.fakeaccel.attn import FakeAttnImpl

    if how == "simulated":
        monkeypatch.setenv("ATTNRT_DEVICE", "fakeaccel:fa3")
    else:
        monkeypatch.setenv("FAKEACCEL_VISIBLE", "fa3")
    attnrt.clear_caches()
    layer = attnrt.LocalAttention(num_heads=4, head_size=64)
    q, k, v = randn_qkv(2, 48, 4, 64)
    before = FakeAttnImpl.calls
    out = layer(q, k, v)
    assert layer.backend_name == "FAKE_ATTN"
    assert FakeAttnImpl.calls == before + 1
    assert rel_l2(out, dense_reference(q, k, v)) < 1e-5
    assert layer.decision.device.simulated is (how == "simulated")
    assert torch.equal(out, layer(q, k, v))
