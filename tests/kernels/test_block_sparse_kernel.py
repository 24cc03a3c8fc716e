"""The block-sparse Triton kernel against its float64 reference: values, lse, gradients,
partial and empty key blocks, rows that visit nothing, GQA, N not a multiple of the block.

Interpreter cases (CPU, TRITON_INTERPRET=1 from tests/conftest.py) use tiny fp16/fp32 shapes
(bf16 dots are wrong under the interpreter); `gpu` cases cover every supported block size, head
size and dtype.
"""

from __future__ import annotations

import pytest
import torch

from attnrt.kernels.block_sparse import (
    block_mask_to_index,
    block_sparse_attention,
    block_sparse_attention_reference,
)
from attnrt.kernels.block_sparse import launch as bs_launch
from attnrt.kernels.block_sparse import options as bs_options
from tests.conftest import TOLERANCE, rel_l2

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every kernel output starts as NaN, so an element the kernel never wrote fails a test;
    the Gluon switches are off, as these tests are the Triton kernels' (the Gluon kernels have
    test_block_sparse_gluon.py and test_block_sparse_gluon_bwd.py)."""
    made: list[torch.Tensor] = []
    for table in ("GLUON_FORWARD", "GLUON_BACKWARD"):
        monkeypatch.setattr(bs_options, table, dict.fromkeys(getattr(bs_options, table), False))

    def alloc(shape, dtype, device):
        t = torch.full(shape, float("nan"), dtype=dtype, device=device)
        made.append(t)
        return t

    monkeypatch.setattr(bs_launch, "_alloc", alloc)
    return made


def _case(b, n, m, h, hkv, d, bq, bk, density, dtype, seed, device=DEVICE, valid=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=gen).to(dtype).to(device)
    k = torch.randn(b, m, hkv, d, generator=gen).to(dtype).to(device)
    v = torch.randn(b, m, hkv, d, generator=gen).to(dtype).to(device)
    nqb, nkb = -(-n // bq), -(-m // bk)
    mask = torch.rand(b, h, nqb, nkb, generator=gen) < density
    mask[0, 0, 0] = False  # a query block that visits nothing
    index, count = block_mask_to_index(mask)
    kv = None
    if valid:
        cap = (m - torch.arange(nkb) * bk).clamp(max=bk)
        kv = (torch.rand(nkb, generator=gen) * (cap + 1)).long().clamp(max=cap).int()
        kv[0] = 0  # a listed block with no valid key
        kv = kv.to(device)
    return q, k, v, index.to(device), count.to(device), kv


def _grads(fn, q, k, v, index, count, bq, bk, kv, seed):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, index, count, block_q=bq, block_k=bk, key_block_valid=kv,
                  return_lse=True)
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    dlse = torch.randn(lse.shape, generator=gen).to(lse.device) * 0.1
    dlse = torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse.to(lse.dtype)))
    return out, lse, grads


def _check(shape, dtype, valid=False, seed=0, device=DEVICE):
    b, n, m, h, hkv, d, bq, bk, density = shape
    q, k, v, index, count, kv = _case(b, n, m, h, hkv, d, bq, bk, density, dtype, seed, device,
                                      valid)
    out, lse, grads = _grads(block_sparse_attention, q, k, v, index, count, bq, bk, kv, seed)
    ref = [t.double().cpu() for t in (q, k, v)]
    kv_cpu = None if kv is None else kv.cpu()
    r_out, r_lse, r_grads = _grads(block_sparse_attention_reference, *ref, index.cpu(),
                                   count.cpu(), bq, bk, kv_cpu, seed)
    tol = TOLERANCE[dtype]
    assert rel_l2(out, r_out) < tol
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(r_lse))
    fin = torch.isfinite(r_lse)
    assert rel_l2(lse.cpu()[fin], r_lse[fin]) < tol
    for name, g, r in zip("qkv", grads, r_grads, strict=True):
        assert rel_l2(g, r) < 2 * tol, name
    return out, lse, grads


# (B, N, M, H, Hkv, D, block_q, block_k, density)
INTERPRET = [
    (1, 64, 64, 1, 1, 16, 16, 16, 0.5),
    (2, 50, 45, 2, 1, 16, 16, 16, 0.6),     # GQA, N and M not multiples of the blocks
    (1, 40, 70, 2, 2, 24, 32, 16, 0.5),     # padded head size, block_q != block_k
    (1, 33, 64, 4, 2, 32, 16, 32, 0.4),
]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", INTERPRET, ids=lambda s: "-".join(map(str, s)))
def test_interpreter_matches_reference(shape, dtype):
    if HAS_CUDA:
        pytest.skip("interpreter case; the gpu cases below cover CUDA")
    _check(shape, dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreter_partial_key_blocks(dtype):
    if HAS_CUDA:
        pytest.skip("interpreter case; the gpu cases below cover CUDA")
    _check((1, 48, 64, 2, 1, 16, 16, 16, 0.7), dtype, valid=True, seed=3)


@pytest.mark.interpret
def test_rows_that_visit_nothing_are_zero_with_lse_minus_inf():
    q, k, v, index, count, _ = _case(1, 32, 32, 1, 1, 16, 16, 16, 1.0, torch.float32, 1)
    out, lse = block_sparse_attention(q, k, v, index, count, block_q=16, block_k=16,
                                      return_lse=True)
    assert torch.equal(out[0, :16], torch.zeros_like(out[0, :16]))
    assert torch.isneginf(lse[0, 0, :16]).all()
    assert torch.isfinite(lse[0, 0, 16:]).all()


@pytest.mark.interpret
def test_expanded_lists_and_repeat_runs_are_bitwise_equal():
    q, k, v, _, _, _ = _case(2, 32, 48, 2, 2, 16, 16, 16, 1.0, torch.float32, 2)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    index, count = block_mask_to_index(mask)
    index, count = index.expand(2, 2, 2, 3), count.expand(2, 2, 2)
    runs = [_grads(block_sparse_attention, q, k, v, index, count, 16, 16, None, 5)
            for _ in range(2)]
    for a, b in zip(runs[0][2], runs[1][2], strict=True):
        assert torch.equal(a, b)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(),
                                           index.contiguous(), count.contiguous(), block_q=16,
                                           block_k=16)
    assert rel_l2(runs[0][0], ref) < TOLERANCE[torch.float32]


@pytest.mark.interpret
def test_transposed_lists_list_every_visiting_query_block():
    mask = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(9)) < 0.5
    index, count = block_mask_to_index(mask)
    k2q, k2q_count = bs_launch.transpose_lists(index, count, 4)
    expect_index, expect_count = block_mask_to_index(mask.transpose(-1, -2))
    assert torch.equal(k2q_count, expect_count)
    used = torch.arange(5) < k2q_count[..., None]
    assert torch.equal(k2q[used], expect_index[used])


GPU_SHAPES = [(2, 1000, 1000, 4, 2, d, bq, bk, 0.3)
              for d in (64, 128) for bq in (64, 128) for bk in (64, 128)]
GPU_SHAPES += [(1, 777, 900, 4, 4, d, 64, 64, 0.4) for d in (16, 32, 48, 80, 96, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_gpu_matches_reference(shape, dtype):
    _check(shape, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("bk", [64, 128])
def test_gpu_partial_key_blocks(bk):
    _check((1, 1024, 1024, 4, 2, 128, 64, bk, 0.5), torch.bfloat16, valid=True, device="cuda")


@pytest.mark.interpret
def test_strided_key_block_valid_reads_its_own_entries():
    """A key_block_valid view with a stride (every other entry of a longer tensor) means its
    own entries: forward and gradients equal the float64 reference given the same values."""
    q, k, v, index, count, kv = _case(1, 50, 45, 2, 1, 16, 16, 16, 0.7, torch.float32, 8,
                                      valid=True)
    spread = torch.zeros(2 * kv.numel(), dtype=torch.int32, device=kv.device)
    spread[::2] = kv
    spread[1::2] = 16 - kv  # other values where a contiguous read would land
    strided = spread[::2]
    assert strided.stride(0) == 2
    assert torch.equal(strided, kv)
    out, lse, grads = _grads(block_sparse_attention, q, k, v, index, count, 16, 16, strided, 3)
    ref = [t.double().cpu() for t in (q, k, v)]
    r_out, _, r_grads = _grads(block_sparse_attention_reference, *ref, index.cpu(),
                               count.cpu(), 16, 16, kv.cpu(), 3)
    assert rel_l2(out, r_out) < TOLERANCE[torch.float32]
    for name, g, r in zip("qkv", grads, r_grads, strict=True):
        assert rel_l2(g, r) < 2 * TOLERANCE[torch.float32], name
