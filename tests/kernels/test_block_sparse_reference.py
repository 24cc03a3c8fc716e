"""The block-sparse reference (the documented meaning of the kernel), its index helpers and the
refusals every block-sparse entry shares."""

from __future__ import annotations

import math

import pytest
import torch

from attnrt.errors import AttnrtError
from attnrt.kernels.block_sparse import (
    BlockSparseInputError,
    BlockSparseTypeError,
    block_mask_to_index,
    block_sparse_attention,
    block_sparse_attention_reference,
    index_to_block_mask,
)
from tests.conftest import rel_l2
from tests.helpers import dense_reference, randn_qkv


def _brute_force(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """Per (b, h, i) row: softmax over the listed keys only, written loop by loop in float64."""
    b, n, h, d = q.shape
    group = h // k.shape[2]
    out = torch.zeros(b, n, h, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                keys = allowed[bi, hi, i].nonzero().flatten()
                if keys.numel() == 0:
                    continue
                kk = k[bi, keys, hi // group].double()
                s = kk @ q[bi, i, hi].double() / math.sqrt(d)
                out[bi, i, hi] = torch.softmax(s, 0) @ v[bi, keys, hi // group].double()
    return out


def _random_mask(b, h, nqb, nkb, p, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, nqb, nkb, generator=gen) < p


def test_mask_to_index_round_trip_and_order():
    mask = _random_mask(2, 3, 4, 5, 0.5, seed=1)
    index, count = block_mask_to_index(mask)
    assert index.dtype == count.dtype == torch.int32
    assert torch.equal(count, mask.sum(-1).int())
    assert torch.equal(index_to_block_mask(index, count, 5), mask)
    used = index[0, 0, 0, : count[0, 0, 0]]
    assert torch.equal(used, used.sort().values)


def test_reference_with_every_block_is_dense_attention():
    q, k, v = randn_qkv(2, 70, 4, 16, hkv=2, m=50, dtype=torch.float64, seed=3)
    mask = torch.ones(2, 4, 3, 4, dtype=torch.bool)
    index, count = block_mask_to_index(mask)
    out = block_sparse_attention_reference(q, k, v, index, count, block_q=32, block_k=16)
    assert rel_l2(out, dense_reference(q, k, v)) < 1e-12


def test_reference_matches_per_row_brute_force_with_valid_counts():
    q, k, v = randn_qkv(1, 40, 2, 8, m=36, dtype=torch.float64, seed=4)
    mask = _random_mask(1, 2, 3, 3, 0.5, seed=5)
    mask[0, 0, 0] = False  # a query block that visits nothing
    valid = torch.tensor([16, 5, 0], dtype=torch.int32)
    index, count = block_mask_to_index(mask)
    out, lse = block_sparse_attention_reference(q, k, v, index, count, block_q=16, block_k=16,
                                                key_block_valid=valid, return_lse=True)
    cols = torch.arange(36)
    col_ok = (cols % 16) < valid.long()[cols // 16]
    allowed = mask[:, :, torch.arange(40) // 16][..., cols // 16] & col_ok
    assert rel_l2(out, _brute_force(q, k, v, allowed)) < 1e-12
    assert torch.equal(out[0, :16, 0], torch.zeros(16, 8, dtype=torch.float64))
    assert torch.isneginf(lse[0, 0, :16]).all()
    assert torch.equal(torch.isfinite(lse), allowed.any(-1))


def test_reference_gradients_are_finite_with_empty_rows():
    q, k, v = randn_qkv(1, 32, 1, 8, dtype=torch.float64, seed=6)
    mask = torch.tensor([[[[True, False], [False, False]]]])
    index, count = block_mask_to_index(mask)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = block_sparse_attention_reference(q, k, v, index, count, block_q=16, block_k=16)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[0, 16:], torch.zeros(16, 1, 8, dtype=torch.float64))
    assert torch.equal(k.grad[0, 16:], torch.zeros(16, 1, 8, dtype=torch.float64))


def test_entries_past_the_count_are_ignored():
    q, k, v = randn_qkv(1, 32, 1, 8, dtype=torch.float64, seed=7)
    index = torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.int32)
    count = torch.tensor([[[1, 2]]], dtype=torch.int32)
    out = block_sparse_attention_reference(q, k, v, index, count, block_q=16, block_k=16)
    other = index.clone()
    other[0, 0, 0, 1] = 1  # a duplicate past the count: still ignored
    again = block_sparse_attention_reference(q, k, v, other, count, block_q=16, block_k=16)
    assert torch.equal(out, again)


def _args(**over):
    q, k, v = randn_qkv(1, 32, 2, 16, seed=8)
    index, count = block_mask_to_index(torch.ones(1, 2, 2, 2, dtype=torch.bool))
    args = {"q": q, "k": k, "v": v, "block_index": index, "block_count": count,
            "block_q": 16, "block_k": 16}
    args.update(over)
    return args


BAD = [
    ({"q": torch.zeros(2, 3)}, BlockSparseInputError, "q.ndim=2"),
    ({"q": torch.randn(1, 32, 2, 16).int()}, BlockSparseTypeError, "q.dtype=torch.int32"),
    ({"v": torch.randn(1, 32, 2, 16).half()}, BlockSparseTypeError, "v.dtype"),
    ({"k": torch.randn(1, 32, 3, 16), "v": torch.randn(1, 32, 3, 16)}, BlockSparseInputError,
     "num_kv_heads=3"),
    ({"block_q": 0}, BlockSparseInputError, "block_q=0"),
    ({"block_index": torch.zeros(1, 2, 3, 2, dtype=torch.int32)}, BlockSparseInputError,
     "block_index.shape"),
    ({"block_index": torch.zeros(1, 2, 2, 2)}, BlockSparseTypeError, "block_index.dtype"),
    ({"block_count": torch.full((1, 2, 2), 3, dtype=torch.int32)}, BlockSparseInputError,
     "block_count contains 3"),
    ({"block_index": torch.full((1, 2, 2, 2), 2, dtype=torch.int32)}, BlockSparseInputError,
     "key block 2"),
    ({"block_index": torch.zeros(1, 2, 2, 2, dtype=torch.int32)}, BlockSparseInputError,
     "twice"),
    ({"key_block_valid": torch.tensor([16, 17], dtype=torch.int32)}, BlockSparseInputError,
     "key_block_valid"),
    ({"key_block_valid": torch.tensor([16], dtype=torch.int32)}, BlockSparseInputError,
     "key_block_valid.shape"),
    ({"softmax_scale": -1.0}, BlockSparseInputError, "softmax_scale=-1.0"),
    ({"return_lse": 1}, BlockSparseTypeError, "return_lse=1"),
]


@pytest.mark.parametrize("fn", [block_sparse_attention_reference, block_sparse_attention])
@pytest.mark.parametrize(("over", "err", "text"), BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_a_typed_error_naming_the_argument(fn, over, err, text):
    args = _args(**over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    index, count = args.pop("block_index"), args.pop("block_count")
    with pytest.raises(err, match=text.replace("(", r"\(").replace(".", r"\.")) as info:
        fn(q, k, v, index, count, **args)
    assert isinstance(info.value, AttnrtError)


@pytest.mark.parametrize(("over", "text"), [
    ({"block_q": 48}, "block_q=48"),
    ({"q": torch.randn(1, 32, 2, 12), "k": torch.randn(1, 32, 2, 12),
      "v": torch.randn(1, 32, 2, 12)}, "head_size=12"),
    ({"q": torch.randn(1, 32, 2, 16).double(), "k": torch.randn(1, 32, 2, 16).double(),
      "v": torch.randn(1, 32, 2, 16).double()}, "q.dtype=torch.float64"),
])
def test_kernel_limits_are_refused_but_the_reference_runs(over, text):
    args = _args(**over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    index, count = args.pop("block_index"), args.pop("block_count")
    if "block_q" in over:
        index, count = block_mask_to_index(torch.ones(1, 2, 1, 2, dtype=torch.bool))
    with pytest.raises(AttnrtError, match=text.replace(".", r"\.")):
        block_sparse_attention(q, k, v, index, count, **args)
    out = block_sparse_attention_reference(q, k, v, index, count, **args)
    assert torch.isfinite(out).all()
