"""SLA against its independent float64 reference (attnrt.sparse.sla_reference): selection,
values, gradients, metadata precedence, checkpoints and refusals.

CPU shapes are tiny (N <= 128) with small blocks so several blocks exist; the sparse branch runs
through attnrt.kernels.block_sparse (the Triton interpreter on CPU once the kernel lands).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnrt.sparse.block_select import get_block_map, select_blocks, selected_count
from attnrt.sparse.method_errors import CheckpointShapeError, SparseArgumentError
from attnrt.sparse.sla import (
    SLAAttentionImpl,
    SLAAttentionMetadata,
    SLAAttentionMetadataBuilder,
)
from attnrt.sparse.sla_reference import selection_mask, sla_reference
from tests.conftest import TOLERANCE, rel_l2

BLOCKS = {"BLKQ": 32, "BLKK": 16}


def qkv(b: int, n: int, h: int, d: int, hkv: int | None = None, m: int | None = None,
        seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hkv, m = hkv or h, m or n
    return (torch.randn(b, n, h, d, generator=gen).to(dtype),
            torch.randn(b, m, hkv, d, generator=gen).to(dtype),
            torch.randn(b, m, hkv, d, generator=gen).to(dtype))


def make_impl(h: int = 2, d: int = 32, hkv: int | None = None, seed: int = 1,
              **kw: object) -> SLAAttentionImpl:
    kw = {**BLOCKS, "compute_dtype": torch.float32, "topk_ratio": 0.25, **kw}
    impl = SLAAttentionImpl(num_heads=h, head_size=d, num_kv_heads=hkv, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking projection, so the linear branch counts
        impl.proj_l.weight.copy_(torch.randn(d, d, generator=gen) * 0.3)
        impl.proj_l.bias.copy_(torch.randn(d, generator=gen) * 0.1)
    return impl


def reference(impl: SLAAttentionImpl, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return sla_reference(q, k, v, impl.proj_l.weight.detach(), impl.proj_l.bias.detach(),
                         ratio or impl.topk_ratio, impl.feature_map, impl.BLKQ, impl.BLKK,
                         impl.softmax_scale, unvisited_only=impl.fused_linear)


class TestSelection:
    @pytest.mark.parametrize(("n", "m", "hkv"), [(128, 128, 2), (100, 77, 1), (96, 130, 2)])
    def test_matches_reference_mask(self, n: int, m: int, hkv: int) -> None:
        q, k, _ = qkv(2, n, 2, 16, hkv=hkv, m=m, seed=n + m, dtype=torch.float64)
        index, count, topk = select_blocks(q, k, 0.3, 32, 16)
        got = torch.zeros(2, 2, index.shape[2], -(-m // 16), dtype=torch.bool)
        got.scatter_(-1, index.long(), True)
        for b in range(2):
            for h in range(2):
                want = selection_mask(q[b, :, h], k[b, :, h // (2 // hkv)], 0.3, 32, 16)
                assert torch.equal(got[b, h], want)
        assert (count == topk).all()
        assert topk == int(0.3 * -(-m // 16))

    def test_key_centring_matters(self) -> None:
        q, k, _ = qkv(1, 64, 1, 16, seed=3, dtype=torch.float64)
        shifted = k + 5 * torch.randn(1, 1, 1, 16, dtype=torch.float64)
        a = select_blocks(q, k, 0.25, 16, 16)[0].sort(-1).values
        b = select_blocks(q, shifted, 0.25, 16, 16)[0].sort(-1).values
        assert torch.equal(a, b)  # a shift shared by every key changes no choice

    def test_fastvideo_layout(self) -> None:
        q, k, _ = qkv(1, 64, 2, 16, seed=4)
        sparse_map, lut, topk = get_block_map(q.transpose(1, 2), k.transpose(1, 2), 0.5, 16, 16)
        assert sparse_map.dtype == torch.int8
        assert sparse_map.shape == (1, 2, 4, 4)
        assert lut.shape == (1, 2, 4, topk)
        assert topk == 2
        assert (sparse_map.sum(-1) == 2).all()

    def test_count_rule_truncates_and_refuses_zero(self) -> None:
        assert selected_count(0.1, 25) == 2
        assert selected_count(1.0, 7) == 7
        with pytest.raises(SparseArgumentError, match=r"topk_ratio=0.1 keeps no key block of 5"):
            selected_count(0.1, 5)


class TestForward:
    @pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
    @pytest.mark.parametrize("fused", [False, True])
    def test_fp32_matches_reference(self, feature_map: str, fused: bool) -> None:
        impl = make_impl(feature_map=feature_map, fused_linear=fused)
        q, k, v = qkv(1, 96, 2, 32, seed=7)
        out = impl(q, k, v, None)
        ref, _ = reference(impl, q, k, v)
        assert out.dtype == torch.float32
        assert rel_l2(out, ref) < TOLERANCE[torch.float32] * 10

    def test_gqa_ragged_lengths(self) -> None:
        impl = make_impl(h=4, hkv=2, d=16, fused_linear=True)
        q, k, v = qkv(2, 70, 4, 16, hkv=2, m=90, seed=8)
        assert rel_l2(impl(q, k, v, None), reference(impl, q, k, v)[0]) < 1e-4

    def test_fp16_compute(self) -> None:
        impl = make_impl(use_bf16=False, compute_dtype=None)
        assert impl.dtype == torch.float16
        q, k, v = qkv(1, 64, 2, 32, seed=9, dtype=torch.float16)
        out = impl(q, k, v, None)
        assert out.dtype == torch.float16
        assert rel_l2(out, reference(impl, q, k, v)[0]) < TOLERANCE[torch.float16]

    def test_fused_differs_from_unfused(self) -> None:
        q, k, v = qkv(1, 64, 2, 32, seed=10)
        a, b = make_impl()(q, k, v, None), make_impl(fused_linear=True)(q, k, v, None)
        assert rel_l2(a, b) > 1e-3  # the option changes the computation

    def test_zero_proj_is_sparse_branch_only(self) -> None:
        impl = SLAAttentionImpl(num_heads=2, head_size=32, topk_ratio=0.5,
                                compute_dtype=torch.float32, **BLOCKS)
        q, k, v = qkv(1, 64, 2, 32, seed=11)
        ref, _ = sla_reference(q, k, v, torch.zeros(32, 32), torch.zeros(32), 0.5,
                               block_q=32, block_k=16)
        assert rel_l2(impl(q, k, v, None), ref) < 1e-5


class TestBackward:
    @pytest.mark.parametrize("fused", [False, True])
    def test_grads_match_reference(self, fused: bool) -> None:
        impl = make_impl(fused_linear=fused)
        q, k, v = (t.requires_grad_() for t in qkv(1, 64, 2, 32, seed=12))
        dout = torch.randn(1, 64, 2, 32, generator=torch.Generator().manual_seed(5))
        impl(q, k, v, None).backward(dout)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        w64 = impl.proj_l.weight.detach().double().requires_grad_()
        b64 = impl.proj_l.bias.detach().double().requires_grad_()
        ref, _ = sla_reference(q64, k64, v64, w64, b64, 0.25, "softmax", 32, 16,
                               impl.softmax_scale, unvisited_only=fused)
        ref.backward(dout.double())
        for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad),
                          (impl.proj_l.weight.grad, w64.grad), (impl.proj_l.bias.grad, b64.grad)):
            assert rel_l2(got, want) < 1e-4

    def test_zero_initialised_proj_gets_gradient(self) -> None:
        impl = SLAAttentionImpl(num_heads=2, head_size=32, compute_dtype=torch.float32,
                                topk_ratio=0.5, **BLOCKS)
        q, k, v = qkv(1, 64, 2, 32, seed=13)
        impl(q, k, v, None).square().sum().backward()
        assert impl.proj_l.weight.grad is not None
        assert impl.proj_l.weight.grad.abs().sum() > 0


class TestMetadata:
    def test_explicit_ratio_wins(self) -> None:
        impl = make_impl(topk_ratio=0.25)
        q, k, v = qkv(1, 128, 2, 32, seed=14)
        meta = SLAAttentionMetadataBuilder().build(current_timestep=3, topk_ratio=0.75)
        assert rel_l2(impl(q, k, v, meta), reference(impl, q, k, v, ratio=0.75)[0]) < 1e-4
        assert rel_l2(impl(q, k, v, meta), reference(impl, q, k, v, ratio=0.25)[0]) > 1e-3

    def test_default_metadata_keeps_layer_ratio(self) -> None:
        impl = make_impl()
        q, k, v = qkv(1, 128, 2, 32, seed=15)
        for meta in (SLAAttentionMetadata(current_timestep=1),
                     SLAAttentionMetadataBuilder().build(current_timestep=1, VSA_sparsity=0.9)):
            assert meta.topk_ratio is None
            assert rel_l2(impl(q, k, v, meta), reference(impl, q, k, v, ratio=0.25)[0]) < 1e-4

    @pytest.mark.parametrize("bad", [0.0, 1.5, -0.2, True, "0.5"])
    def test_bad_ratio_refused(self, bad: object) -> None:
        allowed = r"topk_ratio=.*allowed: a number in \(0, 1\]"
        with pytest.raises(SparseArgumentError, match=allowed):
            SLAAttentionMetadataBuilder().build(current_timestep=0, topk_ratio=bad)
        q, k, v = qkv(1, 32, 2, 32)
        with pytest.raises(SparseArgumentError, match=r"attn_metadata.topk_ratio"):
            make_impl()(q, k, v, SLAAttentionMetadata(topk_ratio=bad))  # type: ignore[arg-type]


class Holder(nn.Module):
    def __init__(self, impl: nn.Module) -> None:
        super().__init__()
        self.attn_impl = impl


class TestCheckpoint:
    def test_fastvideo_keys_round_trip(self) -> None:
        src, dst = Holder(make_impl(seed=2)), Holder(make_impl(seed=3))
        state = src.state_dict()
        assert set(state) == {"attn_impl.proj_l.weight", "attn_impl.proj_l.bias"}
        dst.load_state_dict(state)
        assert torch.equal(dst.attn_impl.proj_l.weight, src.attn_impl.proj_l.weight)

    def test_shape_mismatch_refused(self) -> None:
        state = {"attn_impl.proj_l.weight": torch.zeros(64, 64),
                 "attn_impl.proj_l.bias": torch.zeros(64)}
        with pytest.raises(CheckpointShapeError, match=r"attn_impl.proj_l.weight has shape "
                                                       r"\(64, 64\).*allowed: \(32, 32\)"):
            Holder(make_impl()).load_state_dict(state)


class TestRefusals:
    @pytest.mark.parametrize(("kwargs", "pattern"), [
        ({"topk_ratio": 0.0}, r"topk_ratio=0.0 is not allowed"),
        ({"topk_ratio": 1.01}, r"topk_ratio=1.01 is not allowed"),
        ({"feature_map": "gelu"}, r"feature_map='gelu' is not supported by SLA_ATTN; allowed: "
                                  r"'softmax', 'elu', 'relu'"),
        ({"BLKQ": 48}, r"BLKQ=48 is not supported by SLA_ATTN; allowed: 16, 32, 64, 128"),
        ({"BLKK": 256}, r"BLKK=256 is not supported"),
        ({"causal": True}, r"causal=True is not supported by SLA_ATTN"),
        ({"causal": 0.125}, r"pass impl arguments by keyword"),
        ({"unknown_flag": 1}, r"extra_impl_args=\['unknown_flag'\] are not supported"),
    ])
    def test_typed_errors(self, kwargs: dict[str, object], pattern: str) -> None:
        with pytest.raises(SparseArgumentError, match=pattern):
            SLAAttentionImpl(num_heads=2, head_size=32, **kwargs)  # type: ignore[arg-type]

    @pytest.mark.parametrize("shapes", [((1, 32, 3, 32), (1, 32, 2, 32)),
                                        ((1, 32, 2, 32), (2, 32, 2, 32)),
                                        ((1, 32, 2, 16), (1, 32, 2, 16)),
                                        ((32, 2, 32), (32, 2, 32))])
    def test_bad_shapes(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        q, k = torch.randn(shapes[0]), torch.randn(shapes[1])
        with pytest.raises(SparseArgumentError, match=r"not supported by SLA_ATTN; allowed: "):
            make_impl()(q, k, k, None)

    def test_errors_are_value_errors(self) -> None:
        assert issubclass(SparseArgumentError, ValueError)
        assert issubclass(CheckpointShapeError, ValueError)
