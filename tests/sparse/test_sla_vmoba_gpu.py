"""GPU parity of SLA (fused and unfused), its linear-branch kernel, and VMoBA against the
float64 references, at the shipped block sizes; run with `pytest -m gpu tests/sparse`."""

from __future__ import annotations

import pytest
import torch

from attnrt.sparse.sla import SLAAttentionImpl
from attnrt.sparse.sla_reference import sla_reference
from attnrt.sparse.vmoba import VideoMobaAttentionMetadataBuilder, VMOBAAttentionImpl
from attnrt.sparse.vmoba_reference import vmoba_reference
from tests.conftest import TOLERANCE, rel_l2

pytestmark = pytest.mark.gpu


def rand(*shape: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def sla(fused: bool, use_bf16: bool) -> SLAAttentionImpl:
    impl = SLAAttentionImpl(num_heads=4, head_size=128, topk_ratio=0.25, fused_linear=fused,
                            use_bf16=use_bf16).cuda()
    with torch.no_grad():
        impl.proj_l.weight.copy_(rand(128, 128, seed=1, dtype=torch.float32) * 0.05)
        impl.proj_l.bias.copy_(rand(128, seed=2, dtype=torch.float32) * 0.05)
    return impl


@pytest.mark.parametrize("fused", [False, True])
def test_sla_bf16_forward(fused: bool) -> None:
    q, k, v = (rand(1, 1000, 4, 128, seed=s, dtype=torch.bfloat16) for s in (3, 4, 5))
    impl = sla(fused, use_bf16=True)
    with torch.no_grad():
        out = impl.forward(q.cuda(), k.cuda(), v.cuda(), None)
    ref, _ = sla_reference(q, k, v, impl.proj_l.weight.cpu(), impl.proj_l.bias.cpu(), 0.25,
                           block_q=128, block_k=64, unvisited_only=fused)
    assert out.dtype == torch.bfloat16
    assert rel_l2(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("fused", [False, True])
def test_sla_fp16_backward(fused: bool) -> None:
    q, k, v = (rand(1, 1000, 4, 128, seed=s, dtype=torch.float16) for s in (6, 7, 8))
    dout = rand(1, 1000, 4, 128, seed=9, dtype=torch.float16)
    impl = sla(fused, use_bf16=False)
    qc, kc, vc = (t.cuda().requires_grad_() for t in (q, k, v))
    impl.forward(qc, kc, vc, None).backward(dout.cuda())
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    w64 = impl.proj_l.weight.detach().cpu().double().requires_grad_()
    b64 = impl.proj_l.bias.detach().cpu().double().requires_grad_()
    ref, _ = sla_reference(q64, k64, v64, w64, b64, 0.25, block_q=128, block_k=64,
                           unvisited_only=fused)
    ref.backward(dout.double())
    for got, want in ((qc.grad, q64.grad), (kc.grad, k64.grad), (vc.grad, v64.grad),
                      (impl.proj_l.weight.grad, w64.grad)):
        assert rel_l2(got, want) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_visited_kernel(dtype: torch.dtype) -> None:
    from attnrt.sparse.linear_branch import visited_linear_torch
    from attnrt.sparse.linear_kernel import visited_linear_triton

    a = rand(2, 700, 4, 128, seed=10, dtype=torch.float32).softmax(-1)
    b = rand(2, 900, 2, 128, seed=11, dtype=torch.float32).softmax(-1)
    v = rand(2, 900, 2, 128, seed=12, dtype=torch.float32)
    gen = torch.Generator().manual_seed(13)
    index = torch.stack([torch.randperm(15, generator=gen) for _ in range(2 * 4 * 6)])
    index = index.view(2, 4, 6, 15).to(torch.int32)
    count = torch.randint(0, 16, (2, 4, 6), generator=gen, dtype=torch.int32)
    want = visited_linear_torch(a.double(), b.double(), v.double(), index, count, 128, 64)
    got = visited_linear_triton(*(t.to(dtype).cuda() for t in (a, b, v)), index.cuda(),
                                count.cuda(), 128, 64)
    tol = 1e-5 if dtype == torch.float32 else TOLERANCE[torch.bfloat16]
    assert rel_l2(got[0], want[0]) < tol
    assert rel_l2(got[1], want[1]) < tol


def vmoba_meta() -> object:
    return VideoMobaAttentionMetadataBuilder().build(
        current_timestep=0, raw_latent_shape=(4, 16, 24), patch_size=(1, 2, 2),
        temporal_chunk_size=1, temporal_topk=2, spatial_chunk_size=(2, 3), spatial_topk=4,
        st_chunk_size=(2, 4, 4), st_topk=3)


@pytest.mark.parametrize(("layer", "chunk"), [(0, 1), (1, (2, 3)), (2, (2, 4, 4))])
def test_vmoba_bf16_forward_fp16_backward(layer: int, chunk: object) -> None:
    meta = vmoba_meta()
    impl = VMOBAAttentionImpl(num_heads=4, head_size=128, softmax_scale=128 ** -0.5,
                              prefix=f"blocks.{layer}")
    q, k, v = (rand(1, 384, 4, 128, seed=20 + s, dtype=torch.bfloat16) for s in range(3))
    with torch.no_grad():
        out = impl.forward(q.cuda(), k.cuda(), v.cuda(), meta)
    ref, _ = vmoba_reference(q, k, v, (4, 8, 12), chunk, topk=(2, 4, 3)[layer])  # type: ignore[arg-type]
    assert rel_l2(out, ref) < TOLERANCE[torch.bfloat16]
    q, k, v = (t.half() for t in (q, k, v))
    qc, kc, vc = (t.cuda().requires_grad_() for t in (q, k, v))
    dout = rand(1, 384, 4, 128, seed=30, dtype=torch.float16)
    impl.forward(qc, kc, vc, meta).backward(dout.cuda())
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = vmoba_reference(q64, k64, v64, (4, 8, 12), chunk, topk=(2, 4, 3)[layer])  # type: ignore[arg-type]
    ref.backward(dout.double())
    for got, want in ((qc.grad, q64.grad), (kc.grad, k64.grad), (vc.grad, v64.grad)):
        assert rel_l2(got, want) < TOLERANCE[torch.float16]
