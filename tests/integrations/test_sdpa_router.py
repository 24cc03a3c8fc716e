"""SdpaRouter (torch SDPA's arguments served through attnrt) and the context-parallel ops,
against float64 references; no diffusers needed.

Shapes: B batch, N queries, M keys, H heads, Hkv kv heads, D head size; [B, N, H, D].
"""

from __future__ import annotations

import math

import pytest
import torch

import attnrt
from attnrt.errors import BackendUnavailableError
from attnrt.integrations.diffusers_cp import backward_op, make_forward_op
from attnrt.integrations.masked import reference_masked
from attnrt.integrations.sdpa_router import SdpaRouter, UnsupportedAttentionArgument
from tests.conftest import rel_l2
from tests.helpers import dense_reference, randn_qkv


def masked_ref64(q, k, v, mask, scale=None):
    """Float64 dense masked attention: bool True attends, float masks add; lse [B, N, H]."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k64, v64 = k64.repeat_interleave(group, 2), v64.repeat_interleave(group, 2)
    s = torch.einsum("bnhd,bmhd->bhnm", q64, k64) * (scale or 1 / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    out = torch.einsum("bhnm,bmhd->bnhd", torch.softmax(s, -1), v64)
    return out, torch.logsumexp(s, -1).transpose(1, 2)


def key_padding(b: int, m: int, valid: int) -> torch.Tensor:
    mask = torch.zeros(b, m, dtype=torch.bool)
    mask[:, :valid] = True
    return mask


@pytest.mark.parametrize("forced", [None, "REFERENCE"])
def test_unmasked_gqa_scale_matches_float64(forced):
    q, k, v = randn_qkv(2, 24, 4, 16, hkv=2, m=20, seed=1)
    router = SdpaRouter()
    with attnrt.force_backend(forced) if forced else torch.no_grad():
        out = router(q, k, v, scale=0.3, enable_gqa=True)
    assert rel_l2(out, dense_reference(q, k, v, scale=0.3)) < 1e-5
    assert sum(router.served.values()) == 1
    if forced:
        assert router.served == {"REFERENCE": 1}


@pytest.mark.parametrize("forced", [None, "REFERENCE"])
@pytest.mark.parametrize("kind", ["bool4d", "additive", "key_padding"])
def test_masks_match_float64(kind, forced):
    q, k, v = randn_qkv(2, 12, 2, 8, m=10, seed=2)
    if kind == "bool4d":
        mask = torch.rand(2, 2, 12, 10, generator=torch.Generator().manual_seed(0)) > 0.3
        mask[..., 0] = True  # no row fully masked
    elif kind == "additive":
        mask = torch.randn(2, 1, 12, 10, generator=torch.Generator().manual_seed(0))
    else:
        mask = key_padding(2, 10, 7)
    ref_mask = mask[:, None, None, :] if kind == "key_padding" else mask
    router = SdpaRouter()
    with attnrt.force_backend(forced) if forced else torch.no_grad():
        out = router(q, k, v, attn_mask=mask)
    assert rel_l2(out, masked_ref64(q, k, v, ref_mask)[0]) < 1e-5
    assert sum(router.served_masked.values()) == 1
    assert router.served == router.served_masked
    if forced:
        assert router.served == {"REFERENCE": 1}


def test_causal_square_and_top_left_rectangular_match_torch():
    q, k, v = randn_qkv(1, 9, 2, 8, m=9, seed=3)
    router = SdpaRouter()
    assert rel_l2(router(q, k, v, is_causal=True), dense_reference(q, k, v, True)) < 1e-5
    q2 = q[:, :5]  # N != M: torch's is_causal is top-left aligned (attnrt's is bottom-right)
    top_left = torch.ones(5, 9, dtype=torch.bool).tril()
    out = router(q2, k, v, is_causal=True)
    assert rel_l2(out, masked_ref64(q2, k, v, top_left)[0]) < 1e-5
    assert router.served_masked.total() == 1


@pytest.mark.parametrize("masked", [False, True])
def test_return_lse_in_diffusers_layout(masked):
    q, k, v = randn_qkv(2, 10, 2, 8, m=14, seed=4)
    mask = key_padding(2, 14, 11) if masked else None
    out, lse = SdpaRouter()(q, k, v, attn_mask=mask, return_lse=True)
    ref_out, ref_lse = masked_ref64(q, k, v, mask[:, None, None, :] if masked else
                                    torch.ones(1, dtype=torch.bool))
    assert lse.shape == (2, 10, 2)
    assert lse.dtype == torch.float32
    assert rel_l2(out, ref_out) < 1e-5
    assert rel_l2(lse, ref_lse) < 1e-5


def test_layers_are_reused_across_calls():
    router = SdpaRouter()
    first = router.layer(2, 2, 8, False, None)
    assert router.layer(2, 2, 8, False, None) is first
    assert router.layer(2, 2, 8, False, 0.5) is not first


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"dropout_p": 0.1}, "dropout_p=0.1"),
    ({"window_size": (4, 4)}, "window_size"),
    ({"is_causal": True, "attn_mask": torch.ones(1, 1, 6, 6, dtype=torch.bool)}, "is_causal"),
    ({"attn_mask": torch.ones(3, 6, dtype=torch.bool)}, "attn_mask.shape"),
    ({"attn_mask": torch.ones(2, 1, 2, 6, 6, dtype=torch.bool)}, "attn_mask.shape"),
    ({"attn_mask": torch.ones(2, 2, 6, 6, dtype=torch.bool)}, "attn_mask.shape"),
    ({"attn_mask": torch.ones(1, 6, dtype=torch.int32)}, "attn_mask.dtype"),
])
def test_refusals_name_the_argument(kwargs, named):
    q, k, v = randn_qkv(1, 6, 2, 8, seed=5)
    router = SdpaRouter()
    with pytest.raises(UnsupportedAttentionArgument, match=named.replace("(", r"\(")):
        router(q, k, v, **kwargs)
    assert router.served.total() == 0


def test_gqa_without_enable_gqa_is_refused():
    q, k, v = randn_qkv(1, 6, 4, 8, hkv=2, seed=6)
    with pytest.raises(UnsupportedAttentionArgument, match="enable_gqa=False"):
        SdpaRouter()(q, k, v)


def test_forced_backend_without_mask_support_is_an_error_not_a_swap():
    q, k, v = randn_qkv(1, 6, 2, 8, seed=7)
    router = SdpaRouter()
    with attnrt.force_backend("FLEX_ATTN"), pytest.raises(BackendUnavailableError,
                                                          match="FLEX_ATTN"):
        router(q, k, v, attn_mask=key_padding(1, 6, 4))
    assert router.served.total() == 0


def test_allow_list_without_mask_backend_refuses_masked_calls():
    q, k, v = randn_qkv(1, 6, 2, 8, seed=8)
    router = SdpaRouter(("FLEX_ATTN",))
    with pytest.raises(UnsupportedAttentionArgument, match="attn_mask"):
        router(q, k, v, attn_mask=key_padding(1, 6, 4))


def test_reference_masked_all_masked_row_is_zero():
    q, k, v = randn_qkv(1, 3, 1, 4, seed=9)
    mask = torch.tensor([[True, True, True], [False, False, False], [True, False, False]])
    out, lse = reference_masked(q, k, v, mask, None, return_lse=True)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert lse[0, 0, 1] == float("-inf")


class _Ctx:
    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _grads64(q, k, v, g, mask=None):
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    out, _ = masked_ref64(*leaves, mask if mask is not None else torch.ones(1, dtype=torch.bool))
    return torch.autograd.grad(out, leaves, g.double())


@pytest.mark.parametrize("masked", [False, True])
def test_cp_ops_ulysses_forward_and_backward(masked):
    q, k, v = randn_qkv(1, 10, 2, 8, seed=10)
    mask = key_padding(1, 10, 7)[:, None, None, :] if masked else None
    router, ctx = SdpaRouter(), _Ctx()
    out, lse = make_forward_op(router)(ctx, q, k, v, mask, return_lse=True)
    assert rel_l2(out, masked_ref64(q, k, v, mask if masked else
                                    torch.ones(1, dtype=torch.bool))[0]) < 1e-5
    g = torch.randn_like(out)
    for got, want in zip(backward_op(ctx, g), _grads64(q, k, v, g, mask), strict=True):
        assert rel_l2(got, want) < 1e-5


def test_cp_ops_ring_chunks_merge_to_the_whole():
    """Two key chunks, merged as diffusers' ring merges them; each chunk's backward from the
    merged out/lse; the gradients add up to the whole attention's."""
    q, k, v = randn_qkv(1, 8, 2, 8, m=12, seed=11)
    fwd = make_forward_op(SdpaRouter())
    parts = [(k[:, :5], v[:, :5]), (k[:, 5:], v[:, 5:])]
    ctxs = [_Ctx(), _Ctx()]
    (o1, l1), (o2, l2) = (fwd(c, q, kc, vc, return_lse=True)
                          for c, (kc, vc) in zip(ctxs, parts, strict=True))
    l1, l2 = l1.unsqueeze(-1), l2.unsqueeze(-1)
    out = o1 - torch.sigmoid(l2 - l1) * (o1 - o2)
    lse = (l1 - torch.nn.functional.logsigmoid(l1 - l2)).squeeze(-1)
    assert rel_l2(out, dense_reference(q, k, v)) < 1e-5
    g = torch.randn_like(out)
    grads = [backward_op(c, g, query=q, key=kc, value=vc, out=out, lse=lse)
             for c, (kc, vc) in zip(ctxs, parts, strict=True)]
    dq, dk, dv = _grads64(q, k, v, g)
    assert rel_l2(grads[0][0] + grads[1][0], dq) < 1e-5
    assert rel_l2(torch.cat([grads[0][1], grads[1][1]], 1), dk) < 1e-5
    assert rel_l2(torch.cat([grads[0][2], grads[1][2]], 1), dv) < 1e-5


def test_reference_masked_chunks_rows_without_changing_the_result():
    q, k, v = randn_qkv(2, 33, 4, 8, hkv=2, m=17, seed=12)
    mask = torch.rand(2, 1, 33, 17, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[..., 0] = True
    whole, lse = reference_masked(q, k, v, mask, 0.4, return_lse=True)
    tiny, tiny_lse = reference_masked(q, k, v, mask, 0.4, return_lse=True, chunk_bytes=1)
    ref, ref_lse = masked_ref64(q, k, v, mask, 0.4)
    assert rel_l2(whole, ref) < 1e-5
    assert rel_l2(tiny, ref) < 1e-5
    assert rel_l2(tiny_lse, ref_lse.transpose(1, 2)) < 1e-5
    assert rel_l2(lse, ref_lse.transpose(1, 2)) < 1e-5
