"""FASTVIDEO_KERNEL_VSA against its documented call, with a recording stand-in for the
`fastvideo_kernel` package, and its refusal (with the install hint) where the package is absent."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from attnrt.errors import BackendUnavailableError
from attnrt.selection.capability import package_status
from attnrt.sparse.vsa_fastvideo_kernel import (
    PACKAGE,
    FastVideoKernelVSABackend,
    FastVideoKernelVSAImpl,
)
from attnrt.sparse.vsa_metadata import VideoSparseAttentionMetadataBuilder, VSAInputError


@pytest.fixture
def fresh_probe():
    package_status.cache_clear()
    yield
    package_status.cache_clear()


@pytest.fixture
def stand_in(monkeypatch, fresh_probe):
    """A fake fastvideo_kernel whose video_sparse_attn records its call and returns 2 q."""
    calls: list[dict] = []

    def video_sparse_attn(q, k, v, variable_block_sizes, q_variable_block_sizes, topk,
                          block_size=64, compress_attn_weight=None):
        calls.append({"q": q, "k": k, "v": v, "sizes": variable_block_sizes,
                      "q_sizes": q_variable_block_sizes, "topk": topk,
                      "block_size": block_size, "gate": compress_attn_weight})
        return 2 * q

    module = types.ModuleType("fastvideo_kernel")
    module.video_sparse_attn = video_sparse_attn
    monkeypatch.setitem(sys.modules, "fastvideo_kernel", module)
    return calls


def _tiled(shape=(5, 6, 7), h=2, d=64):
    md = VideoSparseAttentionMetadataBuilder().build(0, shape, (1, 1, 1), 0.75,
                                                     torch.device("cpu"))
    impl = FastVideoKernelVSAImpl(h, d, d ** -0.5)
    tokens = [torch.randn(1, md.total_seq_length, h, d) for _ in range(4)]
    return impl, md, [impl.preprocess_qkv(t, md) for t in tokens]


def test_the_package_gets_its_documented_call(stand_in):
    impl, md, (q, k, v, gate) = _tiled()
    out = impl.forward(q, k, v, gate, md)
    (call,) = stand_in
    assert call["q"].shape == (1, 2, md.padded_seq_length, 64)  # [B, H, S, D]
    assert torch.equal(call["q"], q.transpose(1, 2))
    assert torch.equal(call["gate"], gate.transpose(1, 2))
    assert call["sizes"] is md.variable_block_sizes
    assert call["q_sizes"] is md.variable_block_sizes
    assert call["topk"] == 2  # ceil(0.25 * 8 cubes)
    assert call["block_size"] == (4, 4, 4)
    assert torch.equal(out, 2 * q)  # back in [B, S, H, D]


def test_absent_package_is_refused_with_the_install_hint(monkeypatch, fresh_probe):
    monkeypatch.setitem(sys.modules, "fastvideo_kernel", None)  # import raises ImportError
    status = package_status(PACKAGE)
    assert status.reason is not None
    assert "pip install fastvideo-kernel" in status.reason.hint
    impl, md, tensors = _tiled()
    with pytest.raises(BackendUnavailableError, match="pip install fastvideo-kernel"):
        impl.forward(*tensors, md)


def test_limits_the_package_lacks_are_refused(stand_in):
    with pytest.raises(VSAInputError, match="softmax_scale=0.5"):
        FastVideoKernelVSAImpl(2, 64, 0.5)
    impl, md, (q, k, v, gate) = _tiled()
    with pytest.raises(VSAInputError, match="num_kv_heads=1"):
        impl.forward(q, k[:, :, :1], v[:, :, :1], gate, md)
    assert stand_in == []
    assert frozenset({"vsa"}) == FastVideoKernelVSABackend.METHODS
    assert FastVideoKernelVSABackend.PACKAGES == (PACKAGE,)
