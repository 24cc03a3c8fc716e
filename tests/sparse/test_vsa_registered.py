"""VIDEO_SPARSE_ATTN and FASTVIDEO_KERNEL_VSA as registered backends of method vsa: FastVideo's
name selects the method, the shipped rules rank our kernel first on cuda, a dense request never
reaches them, and where nothing can run the error names each implementation's reason. The
kernel runs on CPU under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

import attnrt
from attnrt.context import set_forward_context
from attnrt.errors import BackendUnavailableError
from attnrt.selection.device import parse_device_spec, probe
from attnrt.selection.dispatch import decide
from attnrt.selection.request import AttentionRequest
from attnrt.sparse.vsa_backend import VideoSparseAttentionBackend
from attnrt.sparse.vsa_metadata import VideoSparseAttentionMetadataBuilder
from attnrt.sparse.vsa_reference import vsa_reference
from attnrt.tools.cli import main as cli_main
from tests.conftest import TOLERANCE, rel_l2

SHAPE = (4, 4, 8)  # 128 tokens, two whole cubes
H, D = 2, 16


def _inputs(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 128, H, D, generator=gen) for _ in range(4)]


def _run(layer: attnrt.LocalAttention, q, k, v, gate) -> torch.Tensor:
    """The layer's own impl, as FastVideo's VSA layers call it: tile, forward with the gate,
    untile, with the metadata of the forward context."""
    md = VideoSparseAttentionMetadataBuilder().build(0, SHAPE, (1, 1, 1), 0.5,
                                                     torch.device("cpu"))
    impl = layer.impl_for(q.dtype, q.device)
    with set_forward_context(attn_metadata=md):
        tiled = [impl.preprocess_qkv(t, md) for t in (q, k, v, gate)]
        return impl.postprocess_output(impl.forward(*tiled, md), md)


@pytest.mark.interpret
def test_a_layer_allowing_video_sparse_attn_takes_method_vsa_and_runs_it():
    layer = attnrt.LocalAttention(H, D, softmax_scale=D ** -0.5,
                                  supported_attention_backends=("VIDEO_SPARSE_ATTN",))
    q, k, v, gate = _inputs()
    request = layer.request_for(torch.float32)
    assert request.method == "vsa"
    assert layer.decision_for(torch.float32).backend == "VIDEO_SPARSE_ATTN"
    out = _run(layer, q, k, v, gate)
    ref = vsa_reference(*(t.double() for t in (q, k, v, gate)), SHAPE, 0.5)
    assert rel_l2(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.interpret
def test_attnrt_backend_video_sparse_attn_makes_a_fastvideo_layer_vsa(monkeypatch):
    monkeypatch.setenv("ATTNRT_BACKEND", "VIDEO_SPARSE_ATTN")
    layer = attnrt.LocalAttention(H, D, supported_attention_backends=(
        "VIDEO_SPARSE_ATTN", "TORCH_SDPA", "REFERENCE"))
    decision = layer.decision_for(torch.float32)
    assert decision.request.method == "vsa"
    assert decision.backend == "VIDEO_SPARSE_ATTN"
    cross = attnrt.LocalAttention(H, D, supported_attention_backends=("TORCH_SDPA", "REFERENCE"))
    assert cross.decision_for(torch.float32).request.method == "dense"


def test_a_dense_request_never_gets_vsa():
    request = AttentionRequest(128, "bf16", allowed=("VIDEO_SPARSE_ATTN", "FASTVIDEO_KERNEL_VSA",
                                                     "REFERENCE"))
    for device in (probe(), parse_device_spec("cuda:sm90")):
        decision = decide(request, device)
        assert decision.backend == "REFERENCE"
        codes = {c.name: c.reasons[0].code for c in decision.candidates if c.reasons}
        assert codes["VIDEO_SPARSE_ATTN"] == "METHOD"


def test_explain_method_vsa_ranks_our_kernel_then_the_vendor(capsys, monkeypatch):
    monkeypatch.setenv("ATTNRT_DEVICE", "cuda:sm90")
    assert cli_main(["explain", "--head-size", "128", "--dtype", "bf16", "--method", "vsa"]) == 0
    out = capsys.readouterr().out
    assert "method vsa" in out
    assert "chosen:   VIDEO_SPARSE_ATTN" in out
    ours, vendor = "* VIDEO_SPARSE_ATTN      ok", "FASTVIDEO_KERNEL_VSA   not reached"
    assert out.index(ours) < out.index(vendor)


def test_where_nothing_runs_vsa_the_error_names_every_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError) as err:
        attnrt.select(AttentionRequest(128, "bf16", method="vsa"))
    text = str(err.value)
    assert "VIDEO_SPARSE_ATTN runs on CPU only under Triton's interpreter" in text
    assert "FASTVIDEO_KERNEL_VSA" in text
    assert "fastvideo-kernel" in text


def test_pre_ampere_gpus_are_refused_by_arch():
    decision = decide(AttentionRequest(128, "fp16", method="vsa"), parse_device_spec("cuda:sm75"))
    assert decision.backend is None
    verdict = next(c for c in decision.candidates if c.name == "VIDEO_SPARSE_ATTN").verdict()
    assert "sm80 and newer" in verdict
    assert frozenset({"vsa"}) == VideoSparseAttentionBackend.METHODS
