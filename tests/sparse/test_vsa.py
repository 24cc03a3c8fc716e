"""VIDEO_SPARSE_ATTN: the tile layout, FastVideo's metadata builder, the fast path (coarse stage
+ block-sparse fine stage + gate) against the float64 reference of the published algorithm,
forward and backward, and every refusal. Interpreter cases run on CPU at tiny grids; `gpu`
cases at real sizes."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from attnrt.errors import AttnrtError
from attnrt.sparse.vsa_backend import (
    VideoSparseAttentionBackend,
    VideoSparseAttentionImpl,
)
from attnrt.sparse.vsa_layout import cube_of_tokens, tile_layout
from attnrt.sparse.vsa_metadata import (
    VideoSparseAttentionMetadata,
    VideoSparseAttentionMetadataBuilder,
    VSAInputError,
    cur_topk,
)
from attnrt.sparse.vsa_reference import vsa_reference
from tests.conftest import TOLERANCE, rel_l2
from tests.helpers import dense_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _fastvideo_partition(shape):
    """The tile order written as FastVideo's loops describe it (cube by cube, row-major)."""
    t, h, w = shape
    idx = torch.arange(t * h * w).reshape(t, h, w)
    parts = [idx[a:a + 4, b:b + 4, c:c + 4].flatten()
             for a in range(0, t, 4) for b in range(0, h, 4) for c in range(0, w, 4)]
    return torch.cat(parts), torch.tensor([p.numel() for p in parts], dtype=torch.int32)


def _metadata(shape, sparsity, device=DEVICE):
    return VideoSparseAttentionMetadataBuilder().build(
        current_timestep=3, raw_latent_shape=tuple(2 * s for s in shape), patch_size=(2, 2, 2),
        VSA_sparsity=sparsity, device=torch.device(device))


def _inputs(shape, b, h, hkv, d, dtype, seed, device=DEVICE):
    """Tokens whose cube means differ strongly, so the cube ranking is the same in float64 and
    in 16 bits (a near tie would let rounding choose another cube)."""
    gen = torch.Generator().manual_seed(seed)
    cube = cube_of_tokens(shape)
    n, c = cube.numel(), int(cube.max()) + 1

    def make(heads, spread):
        offsets = torch.randn(b, c, heads, d, generator=gen) * spread
        return (torch.randn(b, n, heads, d, generator=gen) * 0.5 + offsets[:, cube])

    q, k, v = make(h, 1.0), make(hkv, 1.0), make(hkv, 0.3)
    gate = torch.rand(b, n, h, d, generator=gen)
    return [t.to(dtype).to(device) for t in (q, k, v, gate)]


def _run_impl(q, k, v, gate, md, grad_seed=None):
    impl = VideoSparseAttentionImpl(q.shape[2], q.shape[3], q.shape[3] ** -0.5,
                                    num_kv_heads=k.shape[2])
    tensors = [t.detach().clone().requires_grad_() for t in (q, k, v, gate)]
    tiled = [impl.preprocess_qkv(t, md) for t in tensors]
    out = impl.postprocess_output(impl.forward(*tiled, md), md)
    if grad_seed is None:
        return out, None
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    grads = torch.autograd.grad(out, tensors, dout.to(out.device, out.dtype))
    return out, grads


def _run_reference(q, k, v, gate, shape, sparsity, grad_seed=None):
    tensors = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, gate)]
    out = vsa_reference(*tensors, shape, sparsity)
    if grad_seed is None:
        return out, None
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    return out, torch.autograd.grad(out, tensors, dout.double())


# ---------------------------------------------------------------- layout and metadata


@pytest.mark.parametrize("shape", [(4, 8, 8), (5, 6, 7), (1, 3, 9), (9, 4, 5)])
def test_layout_matches_fastvideo_tiling_and_round_trips(shape):
    layout = tile_layout(shape, torch.device("cpu"))
    partition, sizes = _fastvideo_partition(shape)
    assert torch.equal(layout["tile_partition_indices"], partition)
    assert torch.equal(layout["variable_block_sizes"], sizes)
    assert torch.equal(layout["tile_partition_indices"][layout["reverse_tile_partition_indices"]],
                       torch.arange(math.prod(shape)))
    md = _metadata(shape, 0.5, "cpu")
    impl = VideoSparseAttentionImpl(2, 8, 8 ** -0.5)
    x = torch.randn(2, math.prod(shape), 2, 8)
    tiled = impl.preprocess_qkv(x, md)
    assert tiled.shape == (2, md.padded_seq_length, 2, 8)
    slots = torch.arange(md.padded_seq_length) % 64
    pad = slots >= sizes.long().repeat_interleave(64)
    assert torch.equal(tiled[:, pad], torch.zeros_like(tiled[:, pad]))
    assert torch.equal(impl.postprocess_output(tiled, md), x)


def test_builder_signature_fields_and_cache():
    params = list(inspect.signature(VideoSparseAttentionMetadataBuilder.build).parameters)
    assert params[:7] == ["self", "current_timestep", "raw_latent_shape", "patch_size",
                          "VSA_sparsity", "device", "cache_tile_buf"]
    a, b = _metadata((5, 6, 7), 0.875, "cpu"), _metadata((5, 6, 7), 0.5, "cpu")
    assert isinstance(a, VideoSparseAttentionMetadata)
    assert (a.dit_seq_shape, a.num_tiles, a.total_seq_length) == ([5, 6, 7], [2, 2, 2], 210)
    assert a.current_timestep == 3
    assert a.VSA_sparsity == 0.875
    assert a.tile_partition_indices is b.tile_partition_indices  # one layout per shape
    assert VideoSparseAttentionBackend.get_builder_cls() is VideoSparseAttentionMetadataBuilder
    assert frozenset({"vsa"}) == VideoSparseAttentionBackend.METHODS
    assert VideoSparseAttentionBackend.get_name() == "VIDEO_SPARSE_ATTN"


@pytest.mark.parametrize(("sparsity", "cubes", "want"),
                         [(0.875, 8, 1), (0.875, 1200, 150), (0.0, 10, 10), (0.99, 10, 1),
                          (0.5, 7, 4)])
def test_topk_is_fastvideos(sparsity, cubes, want):
    assert cur_topk(sparsity, cubes) == want


# ---------------------------------------------------------------- the algorithm


def _check(shape, b, h, hkv, d, dtype, sparsity, seed, device=DEVICE):
    q, k, v, gate = _inputs(shape, b, h, hkv, d, dtype, seed, device)
    md = _metadata(shape, sparsity, device)
    out, grads = _run_impl(q, k, v, gate, md, grad_seed=seed + 1)
    ref, ref_grads = _run_reference(q, k, v, gate, shape, sparsity, grad_seed=seed + 1)
    tol = TOLERANCE[dtype]
    assert rel_l2(out, ref) < tol
    for name, g, r in zip(("q", "k", "v", "gate"), grads, ref_grads, strict=True):
        assert rel_l2(g, r) < 2 * tol, name


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("shape", "h", "hkv", "sparsity"), [
    ((5, 6, 7), 2, 2, 0.75),    # every cube partial but one; 2 of 8 cubes kept
    ((4, 8, 8), 2, 1, 0.5),     # no padding; GQA
    ((3, 5, 4), 1, 1, 0.6),     # a single, partial cube
])
def test_interpreter_matches_reference(shape, h, hkv, sparsity, dtype):
    if HAS_CUDA:
        pytest.skip("interpreter case; the gpu cases cover CUDA")
    _check(shape, 1, h, hkv, 16, dtype, sparsity, seed=11)


@pytest.mark.interpret
def test_interpreter_torch_pool_matches_reference(monkeypatch):
    if HAS_CUDA:
        pytest.skip("interpreter case; the gpu cases cover CUDA")
    from attnrt.sparse import vsa_pool

    monkeypatch.setattr(vsa_pool, "POOL", "torch")
    _check((5, 6, 7), 1, 2, 1, 16, torch.float32, 0.75, seed=12)


@pytest.mark.interpret
def test_sparsity_zero_with_zero_gate_is_dense_attention():
    if HAS_CUDA:
        pytest.skip("interpreter case")
    shape = (5, 6, 7)
    q, k, v, gate = _inputs(shape, 1, 2, 2, 16, torch.float32, 5)
    out, _ = _run_impl(q, k, v, torch.zeros_like(gate), _metadata(shape, 0.0))
    assert rel_l2(out, dense_reference(q, k, v)) < TOLERANCE[torch.float32]


@pytest.mark.interpret
def test_reference_keeps_the_top_cubes_of_the_pooled_scores():
    # One query cube, two key cubes, keep one: the fine stage must see only the cube whose mean
    # key aligns with the mean query, whatever its single tokens say.
    shape = (4, 4, 8)
    q = torch.zeros(1, 128, 1, 2, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 128, 1, 2, dtype=torch.float64)
    cube = cube_of_tokens(shape)
    k[0, cube == 0, 0, 0] = -1.0
    k[0, cube == 1, 0, 0] = 1.0
    v = torch.zeros_like(k)
    v[0, cube == 1, 0, 1] = 7.0  # attending cube 1 only gives 7 in channel 1
    out = vsa_reference(q, k, v, torch.zeros_like(q), shape, 0.5)
    assert torch.allclose(out[0, :, 0, 1], torch.full((128,), 7.0, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "h", "hkv", "d"), [
    ((8, 16, 16), 4, 4, 64), ((8, 16, 16), 4, 2, 128), ((5, 14, 18), 4, 4, 128)])
@pytest.mark.parametrize("pool", ["torch", "triton"])
def test_gpu_matches_reference(shape, h, hkv, d, dtype, pool, monkeypatch):
    from attnrt.sparse import vsa_pool

    monkeypatch.setattr(vsa_pool, "POOL", pool)
    _check(shape, 1, h, hkv, d, dtype, 0.75, seed=21, device="cuda")


# ---------------------------------------------------------------- refusals


def _tiled(shape=(5, 6, 7), dtype=torch.float32, d=16):
    q, k, v, gate = _inputs(shape, 1, 2, 2, d, dtype, 1)
    md = _metadata(shape, 0.5)
    impl = VideoSparseAttentionImpl(2, d, d ** -0.5)
    return impl, md, [impl.preprocess_qkv(t, md) for t in (q, k, v, gate)]


def test_bad_builder_input_is_refused():
    builder = VideoSparseAttentionMetadataBuilder()
    for sparsity in (1.0, -0.1, float("nan"), "0.5"):
        with pytest.raises(VSAInputError, match="VSA_sparsity="):
            builder.build(0, (8, 8, 8), (1, 1, 1), sparsity, torch.device("cpu"))
    with pytest.raises(VSAInputError, match="raw_latent_shape="):
        builder.build(0, (8, 8), (1, 1, 1), 0.5, torch.device("cpu"))
    with pytest.raises(VSAInputError, match="each latent size must be at least its patch size"):
        builder.build(0, (1, 8, 8), (2, 2, 2), 0.5, torch.device("cpu"))


@pytest.mark.parametrize("case", ["no_gate", "gate_shape", "gate_dtype", "no_metadata",
                                  "wrong_metadata", "untiled_length", "tile_length", "fp64",
                                  "head_size"])
def test_bad_forward_input_is_a_typed_error_before_any_kernel(case, monkeypatch):
    import attnrt.sparse.vsa as vsa_mod

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the refusal")

    monkeypatch.setattr(vsa_mod, "block_sparse_attention", no_kernel)
    monkeypatch.setattr(vsa_mod, "coarse_stage", no_kernel)
    impl, md, (q, k, v, gate) = _tiled()
    args, expect = [q, k, v, gate, md], "gate_compress"
    if case == "no_gate":
        args[3] = None
    elif case == "gate_shape":
        args[3] = gate[:, :, :1]
    elif case == "gate_dtype":
        args[3] = gate.half()
    elif case == "no_metadata":
        args[4], expect = None, "attn_metadata=NoneType"
    elif case == "wrong_metadata":
        args[4], expect = _metadata((4, 8, 8), 0.5), "query.shape\\[1\\]=512"
    elif case in ("untiled_length", "tile_length"):
        args[:4] = [t[:, :100] for t in args[:4]]
        expect = "query.shape\\[1\\]=100"
    elif case == "fp64":
        args[:4] = [t.double() for t in args[:4]]
        expect = "q.dtype=torch.float64"
    elif case == "head_size":
        impl, md, args4 = _tiled(d=12)
        args, expect = [*args4, md], "head_size=12"
    with pytest.raises(AttnrtError, match=expect):
        impl.forward(*args)


def test_preprocess_refuses_a_sequence_that_is_not_the_latent_grid():
    impl, md, _ = _tiled()
    with pytest.raises(VSAInputError, match="qkv.shape=\\(1, 209, 2, 16\\).*210"):
        impl.preprocess_qkv(torch.randn(1, 209, 2, 16), md)
    with pytest.raises(VSAInputError, match="causal=True"):
        VideoSparseAttentionImpl(2, 16, 0.25, causal=True)


@pytest.mark.interpret
def test_strided_variable_block_sizes_read_as_their_own_entries():
    """Metadata whose variable_block_sizes is a strided view (every other entry of a longer
    tensor, other values between) gives the result of the same sizes stored contiguously: the
    pooling kernel and the fine stage read each cube's own count."""
    if HAS_CUDA:
        pytest.skip("interpreter case")
    shape = (5, 6, 7)
    md = _metadata(shape, 0.5)
    q, k, v, gate = _inputs(shape, 1, 2, 2, 16, torch.float32, seed=14)
    want, _ = _run_impl(q, k, v, gate, md)
    sizes = md.variable_block_sizes
    spread = torch.full((2 * sizes.numel(),), 64, dtype=sizes.dtype, device=sizes.device)
    spread[::2] = sizes
    md.variable_block_sizes = spread[::2]
    assert md.variable_block_sizes.stride(0) == 2
    got, _ = _run_impl(q, k, v, gate, md)
    assert rel_l2(got, want) < 1e-6
