"""CUDNN_BSA_VSA against cuDNN's documented BSA call, with a recording stand-in for the `cudnn`
package (and its CuTe DSL runtime `cutlass`): the call itself, the whole VSA forward against
attnrt's float64 reference, the refusal with the install hint where the package is absent, and
typed refusals of what the package does not take. The real package runs under `-m gpu`."""

from __future__ import annotations

import re
import sys
import types

import pytest
import torch

import attnrt
from attnrt.errors import AttnrtError, BackendUnavailableError
from attnrt.selection.capability import package_status
from attnrt.sparse import vsa_cudnn_bsa
from attnrt.sparse.vsa_cudnn_bsa import (
    CUTE_DSL,
    PACKAGE,
    CudnnBsaVSABackend,
    CudnnBsaVSAImpl,
)
from attnrt.sparse.vsa_layout import CUBE_TOKENS
from attnrt.sparse.vsa_metadata import VideoSparseAttentionMetadataBuilder, VSAInputError
from attnrt.sparse.vsa_reference import vsa_reference
from tests.conftest import TOLERANCE, rel_l2


def documented_bsa(q, k, v, index, count, sizes, block):
    """The documented meaning, float64-capable, on bshd tensors: query block m attends the valid
    tokens (the first sizes[j]) of the key blocks index[b, h, m, :count]; softmax over them."""
    b, n, h, d = q.shape
    m, group = k.shape[1], h // k.shape[2]
    kf, vf = (t.repeat_interleave(group, dim=2) for t in (k, v))
    blocks = torch.zeros(b, h, -(-n // block), -(-m // block), dtype=torch.bool)
    blocks.scatter_(-1, index[..., :count].long().cpu(), True)
    pos = torch.arange(m)
    valid = (pos % block) < sizes.cpu().long()[pos // block]  # [M]
    keep = blocks[:, :, torch.arange(n) // block][..., pos // block] & valid  # [B, H, N, M]
    return keep, kf, vf


def _stand_in_forward(calls, compute):
    def block_sparse_attention_forward(q_tensor, k_tensor, v_tensor, q2k_block_index,
                                       block_sparse_num=None, block_sizes=None,
                                       q2k_block_nums=None, *, sparse_block_size=None,
                                       allow_empty_block_nums=False, softmax_scale=None,
                                       pack_gqa=None, layout="bhsd", kv_splits=1, use_clc=None):
        calls.append({"q": q_tensor, "k": k_tensor, "v": v_tensor, "index": q2k_block_index,
                      "num": block_sparse_num, "sizes": block_sizes, "nums": q2k_block_nums,
                      "block": sparse_block_size, "scale": softmax_scale, "layout": layout})
        if not compute:
            return {"o_tensor": torch.zeros_like(q_tensor), "lse_tensor": None}
        keep, kf, vf = documented_bsa(q_tensor, k_tensor, v_tensor, q2k_block_index,
                                         block_sparse_num, block_sizes, sparse_block_size)
        scores = torch.einsum("bnhd,bmhd->bhnm", q_tensor, kf) * softmax_scale
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        return {"o_tensor": torch.einsum("bhnm,bmhd->bnhd", probs, vf), "lse_tensor": None}

    return block_sparse_attention_forward


@pytest.fixture
def fresh_probe():
    package_status.cache_clear()
    yield
    package_status.cache_clear()


def _install(monkeypatch, compute: bool) -> list[dict]:
    calls: list[dict] = []
    cudnn = types.ModuleType("cudnn")
    cudnn.BSA = types.SimpleNamespace(  # type: ignore[attr-defined]
        block_sparse_attention_forward=_stand_in_forward(calls, compute))
    monkeypatch.setitem(sys.modules, "cudnn", cudnn)
    monkeypatch.setitem(sys.modules, "cutlass", types.ModuleType("cutlass"))
    return calls


@pytest.fixture
def recording(monkeypatch, fresh_probe):
    """A stand-in `cudnn` whose BSA forward records its call and returns zeros."""
    return _install(monkeypatch, compute=False)


@pytest.fixture
def computing(monkeypatch, fresh_probe):
    """A stand-in `cudnn` whose BSA forward computes the documented meaning in torch."""
    return _install(monkeypatch, compute=True)


def _tensors(shape, h, hkv, d, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1] * shape[2]
    heads = (h, hkv, hkv, h)
    return [torch.randn(1, n, x, d, generator=gen).to(device=device, dtype=dtype) for x in heads]


def _tiled(shape, sparsity, tokens, scale=None, device="cpu"):
    md = VideoSparseAttentionMetadataBuilder().build(0, shape, (1, 1, 1), sparsity,
                                                     torch.device(device))
    d = tokens[0].shape[-1]
    impl = CudnnBsaVSAImpl(tokens[0].shape[2], d, d ** -0.5 if scale is None else scale)
    return impl, md, [impl.preprocess_qkv(t, md) for t in tokens]


def test_the_package_gets_its_documented_call(recording):
    # 8x8x4: 4 cubes; key cubes 1 and 3 get +-e0 keys so each query cube's top 2 are known.
    shape, scale = (8, 8, 4), 0.3
    q, k, v, gate = (torch.zeros(1, 256, 2, 64, dtype=torch.bfloat16) for _ in range(4))
    q[..., 0] = 1.0
    impl, md, tiled = _tiled(shape, 0.5, [q, k, v, gate], scale)
    kt = tiled[1]
    kt[:, CUBE_TOKENS:2 * CUBE_TOKENS, :, 0] = 2.0  # cube 1: best score
    kt[:, 3 * CUBE_TOKENS:, :, 0] = 1.0  # cube 3: second
    with torch.no_grad():
        out = impl.forward(*tiled, md)
    (call,) = recording
    assert call["q"] is tiled[0]
    assert call["k"] is kt
    assert call["v"] is tiled[2]
    assert call["layout"] == "bshd"
    assert call["block"] == 64
    assert call["scale"] == scale
    assert call["num"] == 2
    assert call["nums"] is None
    index = call["index"]
    assert index.dtype == torch.int32
    assert index.shape == (1, 2, 4, 2)
    assert torch.equal(index.sort(dim=-1).values, torch.tensor([1, 3]).expand(1, 2, 4, 2).int())
    assert call["sizes"].dtype == torch.int32
    assert torch.equal(call["sizes"], md.variable_block_sizes)
    assert call["sizes"].tolist() == [64, 64, 64, 64]
    assert out.shape == tiled[0].shape


def test_partial_cubes_pass_their_valid_counts(recording):
    impl, md, tiled = _tiled((5, 6, 7), 0.75, _tensors((5, 6, 7), 2, 2, 64, torch.float16, 1))
    with torch.no_grad():
        impl.forward(*tiled, md)
    (call,) = recording
    assert call["sizes"].tolist() == [64, 48, 32, 24, 16, 12, 8, 6]  # T, H, W edges cut cubes
    assert call["index"].shape == (1, 2, 8, 2)
    assert call["num"] == 2


@pytest.mark.parametrize(("shape", "h", "hkv", "sparsity"), [
    ((5, 6, 7), 2, 2, 0.75), ((6, 9, 5), 4, 2, 0.5)])
def test_forward_equals_the_vsa_reference_in_float64(computing, monkeypatch, shape, h, hkv,
                                                     sparsity):
    # The stand-in computes in float64; the adapter's dtype check admits it for this test only.
    monkeypatch.setitem(vsa_cudnn_bsa.DTYPES, torch.float64, "fp64")
    tokens = _tensors(shape, h, hkv, 64, torch.float64, seed=7)
    impl, md, tiled = _tiled(shape, sparsity, tokens)
    assert torch.unique(md.variable_block_sizes).numel() > 1  # partial cubes
    with torch.no_grad():
        out = impl.postprocess_output(impl.forward(*tiled, md), md)
    ref = vsa_reference(*tokens, shape, sparsity)
    assert len(computing) == 1
    assert rel_l2(out, ref) < 1e-5


@pytest.mark.parametrize(("absent", "hint"), [
    ("cudnn", "pip install 'nvidia-cudnn-frontend>=1.32'"),
    ("cutlass", "pip install 'nvidia-cutlass-dsl[cu13]>=4.8'")])
def test_absent_package_is_refused_with_the_install_hint(monkeypatch, recording, local_packages,
                                                         absent, hint):
    monkeypatch.setitem(sys.modules, absent, None)  # import raises ImportError
    decision = attnrt.explain(head_size=128, dtype="bf16", method="vsa", device="cuda:sm90",
                              allowed=("CUDNN_BSA_VSA",))
    assert decision.backend is None
    (candidate,) = [c for c in decision.candidates if c.name == "CUDNN_BSA_VSA"]
    (reason,) = candidate.reasons
    assert reason.code == "PACKAGE_MISSING"
    assert f"import {absent} failed" in reason.message
    assert hint in reason.hint
    impl, md, tiled = _tiled((4, 4, 8), 0.5, _tensors((4, 4, 8), 2, 2, 64, torch.bfloat16, 2))
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match=re.escape(hint)):
        impl.forward(*tiled, md)
    assert recording == []


def _verdict(device: str, **fields) -> tuple[str | None, str]:
    """(chosen backend, CUDNN_BSA_VSA's verdict) for a vsa request allowing only it; a
    simulated device assumes its packages installed."""
    fields = {"head_size": 128, "dtype": "bf16", **fields}
    decision = attnrt.explain(method="vsa", device=device, allowed=("CUDNN_BSA_VSA",), **fields)
    (candidate,) = [c for c in decision.candidates if c.name == "CUDNN_BSA_VSA"]
    return decision.backend, candidate.verdict()


def test_selection_declines_training_and_blackwell_limits():
    assert _verdict("cuda:sm90", num_heads=4, num_kv_heads=2) == ("CUDNN_BSA_VSA", "ok")
    assert _verdict("cuda:sm90", head_size=64, dtype="fp16")[0] == "CUDNN_BSA_VSA"
    backend, verdict = _verdict("cuda:sm90", grad=True)
    assert backend is None
    assert "no backward" in verdict
    backend, verdict = _verdict("cuda:sm100", head_size=64, dtype="fp16", num_heads=4,
                                num_kv_heads=2)
    assert backend is None
    assert "dtype=fp16" in verdict
    assert "head_size=64" in verdict
    assert "GQA" in verdict
    assert _verdict("cuda:sm100")[0] == "CUDNN_BSA_VSA"
    assert "arch=sm80" in _verdict("cuda:sm80")[1]
    assert "dtype=fp32" in _verdict("cuda:sm90", dtype="fp32")[1]


@pytest.mark.parametrize(("case", "expect"), [
    ("fp32", "query.dtype=torch.float32"), ("mixed", "key.dtype=torch.float16"),
    ("head_size", "head_size=32"), ("kv_heads", "num_kv_heads=4"),
    ("strided", "stride\\(-1\\)=2"), ("grad", "requires_grad=True"),
    ("gate", "gate_compress.shape"), ("length", "query.shape\\[1\\]=100"),
    ("metadata", "attn_metadata=NoneType")])
def test_bad_inputs_are_typed_errors_before_any_call(recording, case, expect):
    shape = (4, 4, 8)
    impl, md, (q, k, v, gate) = _tiled(shape, 0.5, _tensors(shape, 6, 2, 64, torch.bfloat16, 3))
    args: list = [q, k, v, gate, md]
    if case == "fp32":
        args[:4] = [t.float() for t in args[:4]]
    elif case == "mixed":
        args[1] = k.half()
    elif case == "head_size":
        args[:4] = [t[..., :32] for t in args[:4]]
    elif case == "kv_heads":
        args[1:3] = [torch.randn(1, 128, 4, 64, dtype=torch.bfloat16) for _ in range(2)]
    elif case == "strided":
        args[2] = torch.randn(1, 128, 2, 128, dtype=torch.bfloat16)[..., ::2]
    elif case == "grad":
        args[0] = q.clone().requires_grad_()
    elif case == "gate":
        args[3] = gate[:, :, :1]
    elif case == "length":
        args[:4] = [t[:, :100] for t in args[:4]]
    elif case == "metadata":
        args[4] = None
    with pytest.raises(AttnrtError, match=expect) as err:
        impl.forward(*args)
    assert isinstance(err.value, ValueError | TypeError)
    assert recording == []
    with pytest.raises(VSAInputError, match="head_size=80 is not allowed for CUDNN_BSA_VSA"):
        CudnnBsaVSAImpl(2, 80, 80 ** -0.5)
    with pytest.raises(VSAInputError, match="causal=True"):
        CudnnBsaVSAImpl(2, 64, 0.125, causal=True)


def test_declared_capabilities():
    assert frozenset({"vsa"}) == CudnnBsaVSABackend.METHODS
    assert CudnnBsaVSABackend.PACKAGES == (PACKAGE, CUTE_DSL)
    assert frozenset() == CudnnBsaVSABackend.BACKWARD_PLATFORMS
    assert frozenset({"fp16", "bf16"}) == CudnnBsaVSABackend.DTYPES


@pytest.mark.gpu
@pytest.mark.parametrize(("shape", "h", "hkv"), [((5, 14, 18), 4, 4), ((8, 16, 16), 4, 2)])
def test_gpu_real_package_matches_the_reference(shape, h, hkv):
    for pkg in (PACKAGE, CUTE_DSL):
        if package_status(pkg).reason is not None:
            pytest.skip(str(package_status(pkg).reason))
    if torch.cuda.get_device_capability()[0] != 9 and hkv != h:
        pytest.skip("GQA runs on sm90 and sm120 only")
    tokens = _tensors(shape, h, hkv, 128, torch.bfloat16, seed=11)
    impl, md, tiled = _tiled(shape, 0.75, [t.cuda() for t in tokens], device="cuda")
    with torch.no_grad():
        out = impl.postprocess_output(impl.forward(*tiled, md), md)
    ref = vsa_reference(*(t.double() for t in tokens), shape, 0.75)
    assert out.dtype == torch.bfloat16
    assert rel_l2(out, ref) < TOLERANCE[torch.bfloat16]


def test_fastvideo_s_head_size_accessor_follows_each_vsa_backend_s_declaration():
    from attnrt.sparse.vsa_backend import VideoSparseAttentionBackend
    from attnrt.sparse.vsa_cudnn_bsa import CudnnBsaVSABackend
    from attnrt.sparse.vsa_fastvideo_kernel import FastVideoKernelVSABackend

    assert VideoSparseAttentionBackend.get_supported_head_sizes() == list(range(16, 257, 8))
    assert FastVideoKernelVSABackend.get_supported_head_sizes() == [64, 128]
    assert CudnnBsaVSABackend.get_supported_head_sizes() == [64, 96, 128]
