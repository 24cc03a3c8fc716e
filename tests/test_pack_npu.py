"""NPU pack: SoC name parsing, the probe, NPU_FUSION_ATTN's exact call and refusals, selection.

No Ascend hardware here: the probe and the adapter run against a stand-in `torch_npu` module in
sys.modules whose npu_fusion_attention has the documented signature (so any unexpected argument is
a TypeError), checks the documented argument rules, and computes what the docs say it computes.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch

import attnrt
from attnrt.platforms import npu as npu_pack
from attnrt.platforms.npu import probe as npu_probe
from attnrt.platforms.npu.fusion_attention import NUM_HEADS, NpuFusionAttnBackend
from attnrt.selection import capability as support
from attnrt.selection.device import Device, PlatformUnavailable, probe_platform
from attnrt.selection.dispatch import decide, reasons_for
from attnrt.selection.manifest import shipped_path
from attnrt.selection.request import AttentionRequest
from tests.conftest import rel_l2
from tests.helpers import dense_reference

RULES = shipped_path()  # the rules under test are the shipped ones





def qkv(n: int, m: int, h: int, hkv: int, d: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(11 * n + m)
    return (torch.randn(2, n, h, d, generator=gen).to(dtype),
            torch.randn(2, m, hkv, d, generator=gen).to(dtype),
            torch.randn(2, m, hkv, d, generator=gen).to(dtype))


# ---------------------------------------------------------------- the stand-in torch_npu


class FakeTorchNpu(types.ModuleType):
    """`torch_npu` with npu_fusion_attention's documented (CANN 7.0) signature; records calls."""

    def __init__(self) -> None:
        super().__init__("torch_npu")
        self.__version__ = "2.1.0.post8"
        self.calls: list[dict[str, Any]] = []

        def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None,
                                 padding_mask=None, atten_mask=None, scale=1.0, keep_prob=1.0,
                                 pre_tockens=2147483647, next_tockens=2147483647,
                                 inner_precise=0, prefix=None, sparse_mode=0,
                                 gen_mask_parallel=True, sync=False):
            call = dict(locals())
            self.calls.append(call)
            return _documented_result(call)

        self.npu_fusion_attention = npu_fusion_attention


def _documented_result(call: dict[str, Any]) -> tuple[Any, ...]:
    """What the docs say the op returns, after checking the documented argument rules."""
    q, k, v = call["query"], call["key"], call["value"]
    if call["input_layout"] != "BSND" or q.dim() != 4:
        raise ValueError(f"stand-in handles BSND only, got {call['input_layout']!r}")
    if call["head_num"] != q.shape[2] or q.shape[2] % k.shape[2]:
        raise ValueError("head_num must be query's N and a multiple of key's N")
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("inputs must be contiguous ND tensors")
    mask, mode = call["atten_mask"], call["sparse_mode"]
    if mode in (2, 3, 4):
        expected = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
        if mask is None or mask.dtype != torch.bool or not torch.equal(mask.cpu(), expected):
            raise ValueError(f"sparse_mode={mode} requires the 2048x2048 compressed bool mask")
    elif mask is not None or mode != 0:
        raise ValueError("stand-in models sparse_mode 3 with its mask, or no mask")
    causal = mode == 3
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError("invalid rows: the adapter promised never to send them")
    out = dense_reference(q, k, v, causal, call["scale"]).to(q.dtype)
    return out, None, None, None, 0, 0, 0


@pytest.fixture
def fake_npu(monkeypatch: pytest.MonkeyPatch) -> FakeTorchNpu:
    module = FakeTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    attnrt.clear_caches()
    return module


# ---------------------------------------------------------------- probe


@pytest.mark.parametrize(("name", "arch"), [
    ("Ascend910B3", "ascend910b"), ("Ascend910B1", "ascend910b"), ("Ascend310P3", "ascend310p"),
    ("Ascend310B4", "ascend310b"), ("Ascend910_9392", "ascend910c"), ("Ascend910A", "ascend910a"),
    ("Ascend910ProB", "ascend910a"), ("Ascend910PremiumA", "ascend910a"),
    ("ascend 910b2", "ascend910b"),
])
def test_soc_names_parse(name: str, arch: str) -> None:
    assert npu_probe.parse_soc_name(name) == arch


@pytest.mark.parametrize("name", ["", "Kunpeng920", "NVIDIA H100"])
def test_non_ascend_names_are_refused_by_name(name: str) -> None:
    with pytest.raises(PlatformUnavailable, match="not an Ascend name") as info:
        npu_probe.parse_soc_name(name)
    assert repr(name) in str(info.value)


def test_probe_without_torch_npu_keeps_the_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(PlatformUnavailable, match="import torch_npu failed"):
        npu_probe.probe()


def _fake_torch_npu_device(monkeypatch: pytest.MonkeyPatch, available: bool,
                           name: str = "Ascend910B3") -> None:
    fake = types.SimpleNamespace(is_available=lambda: available, current_device=lambda: 0,
                                 get_device_name=lambda index: name)
    monkeypatch.setattr(torch, "npu", fake, raising=False)


def test_probe_without_a_device(monkeypatch: pytest.MonkeyPatch, fake_npu: FakeTorchNpu) -> None:
    _fake_torch_npu_device(monkeypatch, available=False)
    with pytest.raises(PlatformUnavailable, match="is_available"):
        npu_probe.probe()


def test_probe_reads_the_soc(monkeypatch: pytest.MonkeyPatch, fake_npu: FakeTorchNpu) -> None:
    _fake_torch_npu_device(monkeypatch, available=True)
    device = npu_probe.probe()
    assert (device.platform, device.arch, device.name) == ("npu", "ascend910b", "Ascend910B3")
    assert dict(device.versions)["torch_npu"] == "2.1.0.post8"


def test_probe_never_crashes_on_this_machine() -> None:
    with pytest.raises(PlatformUnavailable):
        probe_platform("npu")


def test_distributed_backend_is_hccl() -> None:
    assert npu_pack.PLATFORM.dist_backend == "hccl"


# ---------------------------------------------------------------- the adapter's call


@pytest.mark.parametrize(("n", "m", "hkv", "causal"), [
    (40, 40, 4, True), (24, 56, 2, True), (33, 29, 4, False), (21, 21, 1, False)],
    ids=["square-causal", "n<m-causal-gqa", "n>m", "mqa"])
def test_fusion_attention_call_is_the_documented_one(fake_npu: FakeTorchNpu, n: int, m: int,
                                                     hkv: int, causal: bool) -> None:
    q, k, v = qkv(n, m, 4, hkv, 64)
    impl = NpuFusionAttnBackend.get_impl_cls()(4, 64, 0.11, causal, hkv)
    out = impl.forward(q, k, v, None)
    (call,) = fake_npu.calls
    assert (call["head_num"], call["input_layout"], call["scale"]) == (4, "BSND", 0.11)
    assert call["sparse_mode"] == (3 if causal else 0)
    assert (call["atten_mask"] is not None) == causal
    assert call["keep_prob"] == 1.0
    assert call["pse"] is None
    assert call["prefix"] is None
    assert rel_l2(out, dense_reference(q, k, v, causal, 0.11)) < 1e-5


def test_rows_that_see_no_key_are_zero_and_never_sent(fake_npu: FakeTorchNpu) -> None:
    q, k, v = qkv(50, 20, 4, 2, 32)
    out = NpuFusionAttnBackend.get_impl_cls()(4, 32, 0.2, True, 2).forward(q, k, v, None)
    (call,) = fake_npu.calls
    assert call["query"].shape[1] == 20  # only the rows that see keys
    assert torch.equal(out[:, :30], torch.zeros_like(out[:, :30]))
    assert rel_l2(out, dense_reference(q, k, v, True, 0.2)) < 1e-5


def test_default_scale_is_passed_explicitly(fake_npu: FakeTorchNpu) -> None:
    q, k, v = qkv(16, 16, 2, 2, 64, torch.float16)
    out = NpuFusionAttnBackend.get_impl_cls()(2, 64, None, False).forward(q, k, v, None)
    assert fake_npu.calls[0]["scale"] == pytest.approx(1 / 8)  # the op's own default is 1.0
    assert rel_l2(out, dense_reference(q, k, v, False, 1 / 8)) < 3e-3


def test_non_contiguous_inputs_are_made_contiguous(fake_npu: FakeTorchNpu) -> None:
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(12, 12, 2, 2, 32))
    assert not q.is_contiguous()
    out = NpuFusionAttnBackend.get_impl_cls()(2, 32, 0.3, True).forward(q, k, v, None)
    assert rel_l2(out, dense_reference(q, k, v, True, 0.3)) < 1e-5


# ---------------------------------------------------------------- selection and refusals


def _sim(arch: str) -> Device:
    return Device("npu", arch, simulated=True)


def test_npu_fusion_attention_is_chosen_on_910b(fake_npu: FakeTorchNpu) -> None:
    decision = decide(AttentionRequest(128, "bf16", 24, 8, causal=True), _sim("ascend910b"))
    assert decision.backend == "NPU_FUSION_ATTN"
    assert decision.rule is not None
    assert decision.rule.file == RULES
    assert decision.rule.provenance.startswith("source: Ascend Extension for PyTorch")


def test_without_torch_npu_the_walk_falls_back_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    decision = decide(AttentionRequest(128, "bf16", 24), _sim("ascend910b"))
    head = decision.candidates[0]
    assert head.name == "NPU_FUSION_ATTN"
    assert [r.code for r in head.reasons] == [support.PACKAGE_MISSING]
    assert "torch-npu" in head.reasons[0].hint
    assert decision.backend == "TORCH_SDPA"


def test_other_ascend_parts_get_sdpa(fake_npu: FakeTorchNpu) -> None:
    decision = decide(AttentionRequest(128, "fp16", 8), _sim("ascend310p"))
    assert decision.backend == "TORCH_SDPA"
    reasons = reasons_for("NPU_FUSION_ATTN", AttentionRequest(128, "fp16", 8), _sim("ascend310p"))
    assert [r.code for r in reasons] == [support.ARCH]
    assert "arch=ascend310p" in reasons[0].message


@pytest.mark.parametrize(("request_", "code", "text"), [
    (AttentionRequest(1024, "bf16", 8), support.HEAD_SIZE, "head_size=1024"),
    (AttentionRequest(128, "fp64", 8), support.DTYPE, "dtype=fp64"),
    (AttentionRequest(64, "fp16", 512), NUM_HEADS, "num_heads=512"),
])
def test_declared_limits_are_refused_by_name(fake_npu: FakeTorchNpu, request_: AttentionRequest,
                                             code: str, text: str) -> None:
    reasons = reasons_for("NPU_FUSION_ATTN", request_, _sim("ascend910b"))
    assert [r.code for r in reasons] == [code]
    assert text in reasons[0].message


def test_refused_off_npu(fake_npu: FakeTorchNpu) -> None:
    reasons = reasons_for("NPU_FUSION_ATTN", AttentionRequest(128, "bf16", 8),
                          Device("rocm", "gfx942", simulated=True))
    assert [r.code for r in reasons] == [support.PLATFORM]


def test_loading_the_vendor_adapters_imports_no_vendor_package() -> None:
    import subprocess

    code = ("import sys; from attnrt.selection import registry\n"
            "for name in ('AITER', 'NPU_FUSION_ATTN', 'SDPA_CHUNKED'): registry.load(name)\n"
            "print(sorted(m for m in ('aiter', 'torch_npu') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120)
    assert result.stdout.strip() == "[]"
