"""VSA through DistributedAttention_VSA, run on spawned gloo ranks by tests/dist_worker.py
(names "tests.sparse.vsa_dist_checks:<check>"): real VSA (tiling hooks, gate in the exchange,
coarse + fine stages) against single-process VSA on the gathered sequence."""

from __future__ import annotations

import math

import pytest

from attnrt.context import set_forward_context
from attnrt.parallel.layers import DistributedAttention_VSA
from attnrt.selection.registry import is_registered
from attnrt.sparse.vsa_backend import VideoSparseAttentionImpl
from attnrt.sparse.vsa_metadata import VideoSparseAttentionMetadataBuilder, VSAInputError
from tests.dist_worker import Ctx, leaves

# The registered backend itself (attnrt.backends.BACKENDS): on CPU it runs under the Triton
# interpreter, which the spawned ranks inherit from tests/conftest.py (TRITON_INTERPRET=1).
TEST_NAME = "VIDEO_SPARSE_ATTN"


def _register() -> None:
    if not is_registered(TEST_NAME):
        raise AssertionError(f"{TEST_NAME} is not registered")


def _metadata(shape, ctx):
    return VideoSparseAttentionMetadataBuilder().build(0, shape, (1, 1, 1), 0.5, ctx.device)


def _single_process(q, k, v, gate, md):
    impl = VideoSparseAttentionImpl(q.shape[2], q.shape[3], q.shape[3] ** -0.5,
                                    num_kv_heads=k.shape[2])
    tiled = [impl.preprocess_qkv(t, md) for t in (q, k, v, gate)]
    return impl.postprocess_output(impl.forward(*tiled, md), md)


def check_vsa_matches_single_process(ctx: Ctx) -> None:
    """GQA, partial cubes and (with 4 ranks) a padded last shard; outputs and the gradients of
    q, k, v and gate_compress."""
    _register()
    shape, d = (3, 5, 6), 16  # 90 tokens in 4 cubes, each partial
    h, hkv, n = 2 * ctx.world, ctx.world, math.prod(shape)
    s = -(-n // ctx.world)
    full = [ctx.randn(1, n, heads, d, seed=seed)
            for heads, seed in ((h, 1), (hkv, 2), (hkv, 3), (h, 4))]
    md = _metadata(shape, ctx)
    ref_in = leaves(full)
    ref = _single_process(*ref_in, md)
    dist_in = leaves([ctx.shard(t, s) for t in full])
    layer = DistributedAttention_VSA(h, d, hkv, supported_attention_backends=(TEST_NAME,))
    with set_forward_context(attn_metadata=md):
        out, rep = layer(*dist_in[:3], n, gate_compress=dist_in[3])
    assert rep is None
    local = layer.local_for(ctx.world)
    assert local.backend_name == TEST_NAME
    assert local.decision.request.method == "vsa"
    ctx.close(out, ctx.shard(ref, s), "VSA output")
    g = ctx.randn(*ref.shape, seed=7)
    (ref * g).sum().backward()
    (out * ctx.shard(g, s)).sum().backward()
    for i, name in enumerate(("q", "k", "v", "gate_compress")):
        ctx.close(dist_in[i].grad, ctx.shard(ref_in[i].grad, s), f"d{name}")


def check_vsa_refuses_missing_or_mismatched_metadata(ctx: Ctx) -> None:
    """Raised on every rank by the layer's checks, before the exchanges."""
    _register()
    d, h = 16, ctx.world
    q = ctx.randn(1, 24, h, d, seed=5)
    layer = DistributedAttention_VSA(h, d, supported_attention_backends=(TEST_NAME,))
    with pytest.raises(VSAInputError, match="attn_metadata=NoneType"):
        layer(q, q, q, 24 * ctx.world, gate_compress=q)
    with set_forward_context(attn_metadata=_metadata((4, 4, 4), ctx)), \
            pytest.raises(VSAInputError, match=f"original_seq_len={24 * ctx.world}"):
        layer(q, q, q, 24 * ctx.world, gate_compress=q)


VSA_CHECKS = [f"{__name__}:{name}" for name in ("check_vsa_matches_single_process",
                                                "check_vsa_refuses_missing_or_mismatched_metadata")]
