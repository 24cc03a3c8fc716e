"""SageSLA's adapter against a recording stand-in of spas_sage_attn: the documented calls, in
order, with the documented arguments; the result wired as SLA's (sparse + proj_l(linear));
refusals (package missing with a build hint, gradients, head sizes, GQA)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch

from attnrt.sparse import sage_sla
from attnrt.sparse.method_errors import (
    GradientNotSupportedError,
    SageSLAUnavailableError,
    SparseArgumentError,
)
from attnrt.sparse.sla_reference import sla_reference
from tests.conftest import rel_l2


class Recorder:
    """Stands in for spas_sage_attn: records each call; the 'quantizers' pass tensors through
    and the attention kernel computes exact block-sparse attention from them."""

    def __init__(self, sage2pp: bool) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.v: torch.Tensor | None = None
        self.sage2pp = sage2pp

    def record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def modules(self) -> dict[str, types.ModuleType]:
        pkg, qattn = types.ModuleType("spas_sage_attn"), types.ModuleType("spas_sage_attn._qattn")
        fused, utils = (types.ModuleType("spas_sage_attn._fused"),
                        types.ModuleType("spas_sage_attn.utils"))
        rec = self

        def quant(q: torch.Tensor, k: torch.Tensor, km: torch.Tensor, bq: int, bk: int) -> Any:
            rec.record("get_vanilla_qk_quant", q, k, km, bq, bk)
            return q, torch.ones(1), k, torch.ones(1)

        def lut(sparse_map: torch.Tensor) -> Any:
            rec.record("block_map_lut_triton", sparse_map)
            return sparse_map, sparse_map.sum(-1)

        def permute(v: torch.Tensor, out: torch.Tensor, layout: int) -> None:
            rec.record("transpose_pad_permute_cuda", v, out, layout)
            rec.v = v

        def scale_quant(v_t: torch.Tensor, v8: torch.Tensor, v_scale: torch.Tensor, n: int,
                        top: float, layout: int) -> None:
            rec.record("scale_fuse_quant_cuda", v_t, v8, v_scale, n, top, layout)

        def attend(name: str) -> Any:
            def kernel(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, o: torch.Tensor,
                       sparse_map: torch.Tensor, valid: torch.Tensor, *rest: Any) -> None:
                rec.record(name, q8, k8, v8, o, sparse_map, valid, *rest)
                bq = rec.calls[0][1][3]
                bk = rec.calls[0][1][4]
                n = q8.shape[2]
                keep = sparse_map.bool().repeat_interleave(bq, 2)[:, :, :n]
                keep = keep.repeat_interleave(bk, 3)[..., :n]
                scale = rest[-1] if name == "sm90" else rest[-2]
                s = (q8.double() @ k8.double().transpose(-1, -2)) * scale
                p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
                o.copy_(p @ rec.v.double())
            return kernel

        utils.get_vanilla_qk_quant, utils.block_map_lut_triton = quant, lut
        fused.transpose_pad_permute_cuda, fused.scale_fuse_quant_cuda = permute, scale_quant
        qattn.__dict__[sage_sla._SM90] = attend("sm90")
        qattn.__dict__[sage_sla._PV] = attend("pv")
        if self.sage2pp:
            qattn.__dict__[sage_sla._PV_SAGE2PP] = attend("pv16")
        pkg._qattn, pkg._fused, pkg.utils = qattn, fused, utils  # type: ignore[attr-defined]
        return {"spas_sage_attn": pkg, "spas_sage_attn._qattn": qattn,
                "spas_sage_attn._fused": fused, "spas_sage_attn.utils": utils}


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(arch: str, sage2pp: bool = False) -> Recorder:
        rec = Recorder(sage2pp)
        for name, module in rec.modules().items():
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(sage_sla, "device_arch", lambda device: arch)
        sage_sla.load_sparge.cache_clear()
        return rec
    yield install
    sage_sla.load_sparge.cache_clear()


def qkv(n: int = 256, h: int = 2, d: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, n, h, d, generator=gen) for _ in range(3))


def make(**kw: Any) -> sage_sla.SageSLAAttentionImpl:
    impl = sage_sla.SageSLAAttentionImpl(num_heads=2, head_size=64, use_bf16=False, **kw)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        impl.proj_l.weight.copy_(torch.randn(64, 64, generator=gen) * 0.2)
        impl.proj_l.bias.copy_(torch.randn(64, generator=gen) * 0.1)
    return impl


@pytest.mark.parametrize(("arch", "sage2pp", "kernel", "blocks"), [
    ("sm90", False, "sm90", (64, 128)), ("sm89", False, "pv", (128, 64)),
    ("sm89", True, "pv16", (128, 64))])
def test_documented_calls_and_result(stand_in: Any, arch: str, sage2pp: bool, kernel: str,
                                     blocks: tuple[int, int]) -> None:
    rec = stand_in(arch, sage2pp)
    impl = make(topk_ratio=0.5)
    q, k, v = qkv()
    with torch.no_grad():
        out = impl.forward(q, k, v, None)
    names = [name for name, _ in rec.calls]
    assert names == ["get_vanilla_qk_quant", "block_map_lut_triton",
                     "transpose_pad_permute_cuda", "scale_fuse_quant_cuda", kernel]
    quant_args = rec.calls[0][1]
    assert quant_args[3:] == blocks
    assert quant_args[0].shape == (1, 2, 256, 64)  # [B, H, N, D]
    assert quant_args[0].dtype == torch.float16  # use_bf16=False
    assert torch.allclose(quant_args[2], quant_args[1].mean(-2, keepdim=True))
    _, v_t, _ = rec.calls[2][1][:3]
    assert v_t.shape == (1, 2, 64, 256)
    v8, v_scale, n, top, layout = rec.calls[3][1][1:]
    assert (v8.dtype, v_scale.shape, n, top, layout) == (torch.float8_e4m3fn, (1, 2, 64), 256,
                                                          2.25, 1)
    tail = rec.calls[4][1][6:]
    if kernel == "sm90":
        assert tail[3:] == (1, False, 1, impl.softmax_scale)
    else:
        assert torch.equal(tail[0], torch.full((2,), 1e6))
        assert tail[4:] == (1, False, 1, impl.softmax_scale, 0)
    ref, _ = sla_reference(q, k, v, impl.proj_l.weight, impl.proj_l.bias, 0.5,
                           block_q=blocks[0], block_k=blocks[1])
    assert rel_l2(out, ref) < 3e-3  # the stand-in attends the fp16-cast q, k, v


def test_metadata_ratio_reaches_selection(stand_in: Any) -> None:
    rec = stand_in("sm90")  # BLKK = 128: 4 key blocks at N = 512
    impl = make(topk_ratio=0.5)
    with torch.no_grad():
        impl.forward(*qkv(n=512), types.SimpleNamespace(topk_ratio=0.25))
    sparse_map = rec.calls[1][1][0]
    assert (sparse_map.sum(-1) == 1).all()  # int(0.25 * 4), not the layer's int(0.5 * 4)


def test_missing_package_refused_with_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "spas_sage_attn", None)
    sage_sla.load_sparge.cache_clear()
    with pytest.raises(SageSLAUnavailableError, match=r"needs spas_sage_attn; import failed: .*"
                                                      r"build it from source"):
        sage_sla.SageSLAAttentionImpl(num_heads=2, head_size=64)
    sage_sla.load_sparge.cache_clear()


def test_gradients_refused(stand_in: Any) -> None:
    stand_in("sm90")
    q, k, v = (t.requires_grad_() for t in qkv())
    with pytest.raises(GradientNotSupportedError, match=r"forward-only.*torch.no_grad"):
        make().forward(q, k, v, None)


@pytest.mark.parametrize(("kw", "pattern"), [
    ({"head_size": 96}, r"head_size=96 is not supported by SAGE_SLA_ATTN; allowed: 64, 128"),
    ({"num_kv_heads": 1}, r"num_kv_heads=1 is not supported by SAGE_SLA_ATTN"),
    ({"BLKQ": 64}, r"extra_impl_args=\['BLKQ'\] are not supported by SAGE_SLA_ATTN"),
])
def test_bad_arguments(stand_in: Any, kw: dict[str, Any], pattern: str) -> None:
    stand_in("sm90")
    args = {"num_heads": 2, "head_size": 64, **kw}
    with pytest.raises(SparseArgumentError, match=pattern):
        sage_sla.SageSLAAttentionImpl(**args)
