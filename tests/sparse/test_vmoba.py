"""VMoBA against its independent float64 reference (attnrt.sparse.vmoba_reference): chunk
layouts, selection (every mode), values, gradients, layer cycling, metadata and refusals.

Tiny grids (N <= 96) with 16-token kernel blocks, so chunks span several key blocks and some
end mid-block (the key_block_valid path); the attention runs through
attnrt.kernels.block_sparse (the Triton interpreter on CPU once the kernel lands).
"""

from __future__ import annotations

import pytest
import torch

from attnrt.sparse.method_errors import SparseArgumentError, SparseMetadataError
from attnrt.sparse.vmoba import (
    VideoMobaAttentionMetadata,
    VideoMobaAttentionMetadataBuilder,
    VMOBAAttentionImpl,
    layer_chunk,
)
from attnrt.sparse.vmoba_layout import check_chunk, from_chunk_order, to_chunk_order
from attnrt.sparse.vmoba_reference import chunk_of_tokens, vmoba_reference
from attnrt.sparse.vmoba_select import select_chunks
from tests.conftest import rel_l2

GRID = (4, 4, 6)
N = 96
CHUNKS = {"temporal": 3, "spatial": (2, 3), "st": (2, 2, 3)}


def qkv(b: int = 1, h: int = 2, d: int = 16, hkv: int | None = None, seed: int = 0,
        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hkv = hkv or h
    return (torch.randn(b, N, h, d, generator=gen).to(dtype),
            torch.randn(b, N, hkv, d, generator=gen).to(dtype),
            torch.randn(b, N, hkv, d, generator=gen).to(dtype))


def metadata(**kw: object) -> VideoMobaAttentionMetadata:
    settings = {"temporal_chunk_size": 3, "temporal_topk": 2, "spatial_chunk_size": (2, 3),
                "spatial_topk": 2, "st_chunk_size": (2, 2, 3), "st_topk": 3, **kw}
    return VideoMobaAttentionMetadataBuilder().build(
        current_timestep=0, raw_latent_shape=(4, 8, 12), patch_size=(1, 2, 2), **settings)


def impl_for(layer: int, d: int = 16, h: int = 2, hkv: int | None = None) -> VMOBAAttentionImpl:
    return VMOBAAttentionImpl(num_heads=h, head_size=d, softmax_scale=d ** -0.5,
                              num_kv_heads=hkv, prefix=f"transformer.blocks.{layer}.attn1.impl",
                              block_q=16, block_k=16)


def chunk_setting(meta: VideoMobaAttentionMetadata, layer: int) -> tuple[object, int]:
    return layer_chunk(layer, meta)


class TestLayout:
    @pytest.mark.parametrize("kind", ["temporal", "spatial", "st"])
    def test_chunk_order_groups_chunks_and_inverts(self, kind: str) -> None:
        chunk = CHUNKS[kind]
        tokens = check_chunk("chunk", chunk, GRID)
        owner = chunk_of_tokens(GRID, chunk).double()
        x = owner.view(1, N, 1, 1)
        ordered = to_chunk_order(x, GRID, chunk).view(-1)
        want = torch.arange(N).double() // tokens
        assert torch.equal(ordered, want)  # chunk c is tokens [c*S, (c+1)*S) in chunk order
        assert torch.equal(from_chunk_order(to_chunk_order(x, GRID, chunk), GRID, chunk), x)

    @pytest.mark.parametrize(("chunk", "pattern"), [
        ((3, 3), r"does not fit the latent patch grid \(4, 4, 6\); allowed: sizes dividing "
                 r"\(4, 6\)"),
        ((3, 2, 3), r"does not fit the latent patch grid"),
        ((2,), r"allowed: an int \(frames\), \(ch, cw\) or \(ct, ch, cw\)"),
        (0, r"allowed: an int >= 1"),
        (1.5, r"allowed: an int \(frames\)"),
    ])
    def test_bad_chunk_refused(self, chunk: object, pattern: str) -> None:
        with pytest.raises(SparseArgumentError, match=pattern):
            check_chunk("spatial_chunk_size", chunk, GRID)


def grid_order_selection(select: torch.Tensor, chunk: object) -> torch.Tensor:
    """[B, C, H, N chunk order] -> [B, C, H, N grid order]."""
    x = select.permute(0, 3, 2, 1)  # [B, N, H, C]
    return from_chunk_order(x, GRID, chunk).permute(0, 3, 2, 1)  # type: ignore[arg-type]


MODES = [("threshold", "query_head"), ("threshold", "block"), ("threshold", "overall"),
         ("threshold", "head_global"), ("topk", "query_head"), ("topk", "overall"),
         ("topk", "head_global")]


class TestSelection:
    @pytest.mark.parametrize(("mode", "kind"), MODES)
    @pytest.mark.parametrize("layout", ["temporal", "spatial", "st"])
    def test_matches_reference(self, mode: str, kind: str, layout: str) -> None:
        q, k, _ = qkv(b=2, hkv=1, seed=3, dtype=torch.float64)
        chunk = CHUNKS[layout]
        tokens = check_chunk("chunk", chunk, GRID)
        got = select_chunks(to_chunk_order(q, GRID, chunk), to_chunk_order(k, GRID, chunk),
                            tokens, mode, kind, 0.4, 2)
        _, want = vmoba_reference(q, k, k, GRID, chunk, mode, kind, 0.4, 2)
        assert torch.equal(grid_order_selection(got, chunk), want)

    @pytest.mark.parametrize(("mode", "kind"), [("threshold", "query_head"),
                                                ("topk", "head_global")])
    def test_head_groups_select_alike(self, monkeypatch: pytest.MonkeyPatch, mode: str,
                                      kind: str) -> None:
        from attnrt.sparse import vmoba_select

        q, k, _ = qkv(h=4, hkv=2, seed=12)
        whole = select_chunks(q, k, 24, mode, kind, 0.3, 2)
        monkeypatch.setattr(vmoba_select, "GATE_ENTRIES_BUDGET", 1)  # one kv group per pass
        assert torch.equal(select_chunks(q, k, 24, mode, kind, 0.3, 2), whole)

    def test_own_chunk_always_kept_and_selection_is_sparse(self) -> None:
        q, k, _ = qkv(seed=4)
        select = select_chunks(q, k, 24, "threshold", "query_head", 0.0, 1)
        own = torch.arange(N) // 24
        assert select[0, own, :, torch.arange(N)].all()
        assert select.float().mean() < 1.0


class TestForward:
    @pytest.mark.parametrize("layer", [0, 1, 2])
    @pytest.mark.parametrize(("mode", "kind"), [("threshold", "query_head"),
                                                ("topk", "query_head"), ("threshold", "block")])
    def test_fp32_matches_reference(self, layer: int, mode: str, kind: str) -> None:
        meta = metadata(moba_select_mode=mode, moba_threshold_type=kind, moba_threshold=0.3)
        q, k, v = qkv(b=2, seed=5 + layer)
        out = impl_for(layer).forward(q, k, v, meta)
        chunk, topk = chunk_setting(meta, layer)
        ref, _ = vmoba_reference(q, k, v, GRID, chunk, mode, kind, 0.3, topk)  # type: ignore[arg-type]
        assert rel_l2(out, ref) < 1e-5

    def test_gqa_fp16(self) -> None:
        meta = metadata()
        q, k, v = qkv(h=4, hkv=2, seed=6, dtype=torch.float16)
        out = impl_for(1, h=4, hkv=2).forward(q, k, v, meta)
        ref, _ = vmoba_reference(q, k, v, GRID, (2, 3), "threshold", "query_head", 0.25, 2)
        assert out.dtype == torch.float16
        assert rel_l2(out, ref) < 3e-3

    def test_layers_cycle_through_chunk_kinds(self) -> None:
        meta = metadata(temporal_layer=2, spatial_layer=1, st_layer=1, first_full_layer=1)
        kinds = [layer_chunk(i, meta)[0] for i in range(1, 7)]
        assert kinds == [3, 3, (2, 3), (2, 2, 3), 3, 3]


class TestBackward:
    @pytest.mark.parametrize("layer", [0, 2])
    def test_grads_match_reference(self, layer: int) -> None:
        meta = metadata(moba_threshold=0.3)
        q, k, v = (t.requires_grad_() for t in qkv(seed=7 + layer))
        dout = torch.randn(1, N, 2, 16, generator=torch.Generator().manual_seed(8))
        impl_for(layer).forward(q, k, v, meta).backward(dout)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        chunk, topk = chunk_setting(meta, layer)
        ref, _ = vmoba_reference(q64, k64, v64, GRID, chunk, "threshold", "query_head", 0.3,
                                 topk)  # type: ignore[arg-type]
        ref.backward(dout.double())
        for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
            assert rel_l2(got, want) < 1e-5


    def test_head_groups_checkpointed_gqa(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from attnrt.sparse import vmoba_pack

        monkeypatch.setattr(vmoba_pack, "PACKED_BYTES_BUDGET", 1)  # one kv head per call
        meta = metadata(moba_threshold=0.3)
        q, k, v = (t.requires_grad_() for t in qkv(h=4, hkv=2, seed=9))
        dout = torch.randn(1, N, 4, 16, generator=torch.Generator().manual_seed(3))
        impl_for(1, h=4, hkv=2).forward(q, k, v, meta).backward(dout)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, _ = vmoba_reference(q64, k64, v64, GRID, (2, 3), "threshold", "query_head", 0.3, 2)
        ref.backward(dout.double())
        for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
            assert rel_l2(got, want) < 1e-5


class TestRefusals:
    def test_missing_metadata(self) -> None:
        q, k, v = qkv()
        with pytest.raises(SparseMetadataError, match=r"attn_metadata=NoneType is not allowed "
                                                      r"for VMOBA_ATTN \(layer 'transformer"):
            impl_for(0).forward(q, k, v, None)

    def test_sequence_not_the_grid(self) -> None:
        q, k, v = (t[:, :90] for t in qkv())
        with pytest.raises(SparseMetadataError, match=r"N=90 .* allowed: N == M == 96"):
            impl_for(0).forward(q, k, v, metadata())

    def test_prefix_without_layer_index(self) -> None:
        with pytest.raises(SparseArgumentError, match=r"prefix='attn' names no layer index"):
            VMOBAAttentionImpl(num_heads=2, head_size=16, softmax_scale=0.25, prefix="attn")

    @pytest.mark.parametrize(("kw", "pattern"), [
        ({"spatial_chunk_size": (3, 3)}, r"spatial_chunk_size=\(3, 3\) does not fit"),
        ({"st_chunk_size": (3, 2, 3)}, r"st_chunk_size=\(3, 2, 3\) does not fit"),
        ({"moba_select_mode": "random"}, r"moba_select_mode='random' is not supported"),
        ({"moba_threshold_type": "block", "moba_select_mode": "topk"},
         r"moba_threshold_type='block' is not supported by VMOBA_ATTN; allowed: 'query_head', "
         r"'overall', 'head_global'"),
        ({"moba_threshold": 1.5}, r"moba_threshold=1.5 is not supported"),
        ({"moba_select_mode": "topk", "temporal_topk": 0}, r"moba_topk=0 is not supported"),
    ])
    def test_bad_metadata(self, kw: dict[str, object], pattern: str) -> None:
        with pytest.raises(SparseArgumentError, match=pattern):
            metadata(**kw)

    def test_latent_not_divisible_by_patch(self) -> None:
        with pytest.raises(SparseArgumentError, match=r"raw_latent_shape=\(4, 9, 12\)"):
            VideoMobaAttentionMetadataBuilder().build(
                current_timestep=0, raw_latent_shape=(4, 9, 12), patch_size=(1, 2, 2),
                temporal_chunk_size=1, temporal_topk=1, spatial_chunk_size=(1, 1),
                spatial_topk=1, st_chunk_size=(1, 1, 1), st_topk=1)

    @pytest.mark.parametrize(("kw", "pattern"), [
        ({"causal": True}, r"causal=True is not supported by VMOBA_ATTN"),
        ({"block_q": 48}, r"block_q=48 is not supported by VMOBA_ATTN"),
        ({"other": 1}, r"extra_impl_args=\['other'\]"),
    ])
    def test_bad_impl_args(self, kw: dict[str, object], pattern: str) -> None:
        with pytest.raises(SparseArgumentError, match=pattern):
            VMOBAAttentionImpl(num_heads=2, head_size=16, softmax_scale=0.25,
                               prefix="blocks.0", **kw)  # type: ignore[arg-type]
