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


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, select: torch.Tensor,
                       chunk: int) -> torch.Tensor:
    """float64 dense attention of q [B, N, H, D] over the keys of the chunks select [B, C, H, N]
    gives each query (chunk order, one head per key/value head)."""
    q, k, v = q.double(), k.double(), v.double()
    keep = select.permute(0, 2, 3, 1)[..., torch.arange(k.shape[1]) // chunk]  # [B, H, N, M]
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", p, v)


class TestRowMaskLists:
    def test_block_lists_are_the_union_with_each_row_masked_to_its_own(self) -> None:
        from attnrt.sparse.vmoba_layout import key_blocks
        from attnrt.sparse.vmoba_pack import block_lists, vmoba_attention

        select = torch.zeros(1, 4, 1, 32, dtype=torch.bool)  # C = 4 chunks of 8 tokens
        select[0, 0, 0, :8] = True  # block 0 (rows 0-15): rows 0-7 chunk 0, rows 8-15 chunk 2
        select[0, 2, 0, 8:16] = True
        select[0, 3, 0, 16:] = True  # block 1: every row chunk 3
        _, chunk_ids, _ = key_blocks(32, 8, 16, torch.device("cpu"))  # KB = 1 block a chunk
        index, count, row_mask = block_lists(select, 1, chunk_ids, 16)
        assert count.tolist() == [[[2, 1]]]
        assert index[0, 0, 0].tolist() == [0, 2]  # both chunks, in chunk order
        assert row_mask[0, 0, 0].tolist() == [0x00FF, 0xFF00]
        assert index[0, 0, 1, 0].item() == 3
        assert row_mask[0, 0, 1, 0].item() == 0xFFFF
        q, k, v = (torch.randn(1, 32, 1, 16, generator=torch.Generator().manual_seed(s))
                   for s in range(3))
        out = vmoba_attention(q, k, v, select, 8, 16 ** -0.5, block_q=16, block_k=16)
        assert rel_l2(out, selected_attention(q, k, v, select, 8)) < 1e-5

    def test_64_row_blocks_use_bit_63_and_head_groups_agree(self) -> None:
        from attnrt.sparse.vmoba_layout import key_blocks
        from attnrt.sparse.vmoba_pack import block_lists

        gen = torch.Generator().manual_seed(2)
        select = torch.rand(2, 5, 4, 150, generator=gen) < 0.3  # N = 150: a partial block
        _, chunk_ids, _ = key_blocks(150, 30, 16, torch.device("cpu"))
        whole = block_lists(select, 2, chunk_ids, 64)
        grouped = block_lists(select, 2, chunk_ids, 64, kv_heads_per_call=1)
        for a, b in zip(whole, grouped, strict=True):
            assert torch.equal(a, b)
        index, count, row_mask = whole
        kb = chunk_ids.shape[1]
        for c in range(5):  # each listed chunk's word: the rows of the block that chose it
            rows = select[0, c, 1, 64:128]
            want = sum(1 << r for r in range(64) if rows[r])
            want = want - (1 << 64) if want >= 1 << 63 else want  # as int64
            slots = (index[0, 1, 1, :count[0, 1, 1]] == c * kb).nonzero()
            assert (slots.numel() == 1) == bool(rows.any())
            if rows.any():
                assert row_mask[0, 1, 1, slots[0, 0]].item() == want

    def test_refuses_row_blocks_over_64(self) -> None:
        from attnrt.sparse.vmoba_pack import vmoba_attention

        q, k, v = qkv()
        select = torch.ones(1, 4, 2, N, dtype=torch.bool)
        with pytest.raises(SparseArgumentError, match=r"block_q=128 is not supported by "
                                                      r"VMOBA_ATTN; allowed: 16, 32, 64"):
            vmoba_attention(q, k, v, select, 24, 0.25, block_q=128)


ST_GRID = (4, 6, 12)  # st chunks (2, 6, 6) = 72 tokens: two 64-token key blocks, the second 8


def st_metadata(grid_shape: tuple[int, int, int]) -> VideoMobaAttentionMetadata:
    t, hp, wp = grid_shape
    return VideoMobaAttentionMetadataBuilder().build(
        current_timestep=0, raw_latent_shape=(t, 2 * hp, 2 * wp), patch_size=(1, 2, 2),
        temporal_chunk_size=1, temporal_topk=2, spatial_chunk_size=(3, 4), spatial_topk=2,
        st_chunk_size=(2, 6, 6), st_topk=2, moba_threshold=0.3)


def st_case(grid_shape: tuple[int, int, int], h: int, hkv: int, d: int, dtype: torch.dtype,
            device: str) -> tuple[torch.Tensor, ...]:
    n = grid_shape[0] * grid_shape[1] * grid_shape[2]
    gen = torch.Generator().manual_seed(21)
    return tuple(torch.randn(1, n, heads, d, generator=gen).to(device, dtype).requires_grad_()
                 for heads in (h, hkv, hkv))


def check_st_chunks(grid_shape: tuple[int, int, int], h: int, hkv: int, d: int,
                    dtype: torch.dtype, device: str, tol: float) -> None:
    """Layer 2 (st, 72-token chunks) with 64-token blocks against vmoba_reference, out and
    gradients."""
    meta = st_metadata(grid_shape)
    q, k, v = st_case(grid_shape, h, hkv, d, dtype, device)
    impl = VMOBAAttentionImpl(num_heads=h, head_size=d, softmax_scale=d ** -0.5,
                              num_kv_heads=hkv, prefix="blocks.2", block_q=64, block_k=64)
    out = impl.forward(q, k, v, meta)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out)
    out.backward(dout)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, select = vmoba_reference(q64, k64, v64, grid_shape, (2, 6, 6), "threshold",
                                  "query_head", 0.3, 2)
    ref.backward(dout.cpu().double())
    assert select.shape[1] * 72 == q.shape[1]
    assert rel_l2(out, ref) < tol
    grad_tol = 2 * tol if dtype == torch.bfloat16 else tol  # as the kernel's own gpu tests
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_l2(got, want) < grad_tol


class TestChunksSmallerThanBlocks:
    @pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 3e-3)])
    def test_72_token_chunks_64_token_blocks(self, dtype: torch.dtype, tol: float) -> None:
        if torch.cuda.is_available():
            pytest.skip("interpreter case; the gpu case below covers CUDA")
        check_st_chunks(ST_GRID, 2, 1, 16, dtype, "cpu", tol)


@pytest.mark.gpu
def test_gpu_vmoba_st_chunks_bf16() -> None:
    check_st_chunks((8, 12, 12), 4, 2, 128, torch.bfloat16, "cuda", 1.5e-2)
