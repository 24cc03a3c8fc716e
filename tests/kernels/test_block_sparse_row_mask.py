"""The block-sparse kernel's row mask (bit r of row_mask[b, h, i, j]: row r of query block i
attends the entry's key block) against the float64 reference: values, lse, dq/dk/dv, GQA,
partial key blocks, rows masked everywhere, split tiles and gathered steps, the all-ones mask
equal to no mask, and refusals.

Interpreter cases (CPU, TRITON_INTERPRET=1 from tests/conftest.py) use fp16/fp32; the `gpu`
cases run bf16 on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from attnrt.kernels.block_sparse import (
    BlockSparseInputError,
    BlockSparseTypeError,
    block_sparse_attention,
    block_sparse_attention_reference,
)
from attnrt.kernels.block_sparse import launch as bs_launch
from attnrt.kernels.block_sparse.options import Plan
from tests.conftest import TOLERANCE, rel_l2
from tests.kernels.test_block_sparse_kernel import _case, nan_buffers  # noqa: F401 - fixture
from tests.kernels.test_block_sparse_plans import _force

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DEAD_ROW = 3  # row of the last query block (batch 0, head 0) whose bit is clear in every entry


def random_row_mask(index: torch.Tensor, seed: int, dense: float = 0.6) -> torch.Tensor:
    """int64 [B, H, NQB, MAXK] of random bits (each set with probability `dense`), with row
    DEAD_ROW of the last query block of (batch 0, head 0) masked from every entry."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.rand((*index.shape, 64), generator=gen) < dense
    words = (bits.long() << torch.arange(64)).sum(-1)  # distinct powers of two: sum == or
    words[0, 0, -1] &= ~(1 << DEAD_ROW)
    return words.to(index.device)


def _grads(fn, q, k, v, index, count, bq, bk, kv, mask, seed):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, index, count, block_q=bq, block_k=bk, key_block_valid=kv,
                  row_mask=mask, return_lse=True)
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    dlse = torch.randn(lse.shape, generator=gen).to(lse.device) * 0.1
    dlse = torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse.to(lse.dtype)))
    return out, lse, grads


def check_masked(shape, dtype, valid=False, seed=0, device=DEVICE):
    """Kernel vs float64 reference under a random row mask; returns the kernel's (out, lse)."""
    b, n, m, h, hkv, d, bq, bk, density = shape
    q, k, v, index, count, kv = _case(b, n, m, h, hkv, d, bq, bk, density, dtype, seed, device,
                                      valid)
    count[0, 0, -1] = index.shape[-1]  # the dead row's block lists every key block
    mask = random_row_mask(index, seed)
    out, lse, grads = _grads(block_sparse_attention, q, k, v, index, count, bq, bk, kv, mask,
                             seed)
    ref = [t.double().cpu() for t in (q, k, v)]
    kv_cpu = None if kv is None else kv.cpu()
    r_out, r_lse, r_grads = _grads(block_sparse_attention_reference, *ref, index.cpu(),
                                   count.cpu(), bq, bk, kv_cpu, mask.cpu(), seed)
    tol = TOLERANCE[dtype]
    assert rel_l2(out, r_out) < tol
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(r_lse))
    fin = torch.isfinite(r_lse)
    assert rel_l2(lse.cpu()[fin], r_lse[fin]) < tol
    grad_tol = 2 * tol if dtype == torch.bfloat16 else tol  # as the kernel's own gpu tests
    for name, g, r in zip("qkv", grads, r_grads, strict=True):
        assert rel_l2(g, r) < grad_tol, name
    dead = (-(-n // bq) - 1) * bq + DEAD_ROW
    if dead < n:  # masked from every entry: out 0, lse -inf, no gradient
        assert torch.equal(out[0, dead, 0].cpu(), torch.zeros(d, dtype=dtype))
        assert torch.isneginf(lse[0, 0, dead]).item()
        assert torch.equal(grads[0][0, dead, 0].cpu(), torch.zeros(d, dtype=dtype))
    return out, lse


# (B, N, M, H, Hkv, D, block_q, block_k, density)
INTERPRET = [
    (1, 64, 64, 1, 1, 16, 16, 16, 0.7),
    (2, 50, 45, 4, 2, 16, 16, 16, 0.7),     # GQA, N and M not multiples of the blocks
    (1, 40, 70, 2, 2, 24, 32, 16, 0.6),     # padded head size, block_q != block_k
    (1, 128, 64, 2, 1, 16, 64, 32, 0.8),    # 64-row blocks: bit 63 is a row
]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", INTERPRET, ids=lambda s: "-".join(map(str, s)))
def test_interpreter_row_mask_matches_reference(shape, dtype):
    if HAS_CUDA:
        pytest.skip("interpreter case; the gpu cases below cover CUDA")
    check_masked(shape, dtype, seed=1)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreter_row_mask_partial_key_blocks(dtype):
    if HAS_CUDA:
        pytest.skip("interpreter case; the gpu cases below cover CUDA")
    check_masked((1, 48, 64, 2, 1, 16, 16, 16, 0.8), dtype, valid=True, seed=3)


# (step, split) forced on all three kernels: gathered steps shift no bits; split tiles shift
# by the tile's first row.
VARIANTS = [(2, 1), (1, 2), (2, 2), (4, 1)]


@pytest.mark.interpret
@pytest.mark.parametrize(("step", "split"), VARIANTS, ids=lambda v: str(v))
def test_interpreter_row_mask_plans(monkeypatch, step, split):
    if HAS_CUDA:
        pytest.skip("interpreter case")
    plan = Plan(4, 1, step, split)
    _force(monkeypatch, 32, 32, 16, fwd=plan, dq=plan, dkdv=plan)
    check_masked((2, 70, 90, 2, 1, 16, 32, 32, 0.6), torch.float32, valid=True, seed=11)


@pytest.mark.interpret
def test_interpreter_row_mask_dkdv_rows_split(monkeypatch):
    """dK/dV in 16-row steps of 32-row query blocks reads each step's own row bits."""
    if HAS_CUDA:
        pytest.skip("interpreter case")
    _force(monkeypatch, 32, 32, 16, fwd=Plan(4, 1), dq=Plan(4, 1), dkdv=Plan(4, 1, 1, 1, 2))
    check_masked((2, 70, 90, 2, 1, 16, 32, 32, 0.6), torch.float32, valid=True, seed=13)


@pytest.mark.interpret
def test_all_ones_mask_equals_no_mask_bitwise():
    q, k, v, index, count, kv = _case(1, 48, 64, 2, 1, 16, 16, 16, 0.6, torch.float32, 4,
                                      valid=True)
    ones = torch.full(index.shape, -1, dtype=torch.int64)
    with_mask = _grads(block_sparse_attention, q, k, v, index, count, 16, 16, kv, ones, 2)
    without = _grads(block_sparse_attention, q, k, v, index, count, 16, 16, kv, None, 2)
    for a, b in zip((*with_mask[:2], *with_mask[2]), (*without[:2], *without[2]), strict=True):
        assert torch.equal(a, b)


@pytest.mark.interpret
def test_zero_words_leave_the_transposed_lists():
    index = torch.tensor([[[[0, 1], [1, 0]]]], dtype=torch.int32)  # [1, 1, 2, 2]
    count = torch.tensor([[[2, 1]]], dtype=torch.int32)
    mask = torch.tensor([[[[0, 5], [7, 9]]]])  # block 0 -> key 0: no row
    dense = bs_launch.dense_row_mask(index, count, mask, 3)
    assert dense.tolist() == [[[[0, 5, 0], [0, 7, 0]]]]  # entry past count 1 dropped
    k2q, k2q_count = bs_launch.transpose_lists(index, count, 3, dense)
    assert k2q_count.tolist() == [[[0, 2, 0]]]
    assert k2q[0, 0, 1].tolist() == [0, 1]


def _inputs(bq=16):
    q, k, v, index, count, _ = _case(1, 32, 32, 2, 2, 16, bq, 16, 1.0, torch.float32, 0)
    return q, k, v, index, count


@pytest.mark.parametrize("fn", [block_sparse_attention, block_sparse_attention_reference])
@pytest.mark.parametrize(("bad", "error", "pattern"), [
    (lambda i: i.int(), BlockSparseTypeError, r"row_mask.dtype=torch.int32 is not supported"),
    (lambda i: i.long()[..., :1], BlockSparseInputError,
     r"row_mask.shape=\(1, 2, 2, 1\) on cpu is not supported .* expected block_index's shape "
     r"\(1, 2, 2, 2\)"),
    (lambda i: i.long()[0], BlockSparseInputError, r"row_mask.ndim=3 is not supported"),
    (lambda i: torch.zeros(i.shape, dtype=torch.int64, device="meta"), BlockSparseInputError,
     r"row_mask.shape=\(1, 2, 2, 2\) on meta is not supported"),
    (lambda i: [[0]], BlockSparseTypeError, r"row_mask=list is not supported"),
])
def test_bad_row_mask_refused(fn, bad, error, pattern):
    q, k, v, index, count = _inputs()
    with pytest.raises(error, match=pattern):
        fn(q, k, v, index, count, block_q=16, block_k=16, row_mask=bad(index))


@pytest.mark.parametrize("fn", [block_sparse_attention, block_sparse_attention_reference])
def test_row_mask_needs_block_q_at_most_64(fn):
    q, k, v, _, _ = _inputs()
    index = torch.zeros(1, 2, 1, 2, dtype=torch.int32)
    count = torch.ones(1, 2, 1, dtype=torch.int32)
    with pytest.raises(BlockSparseInputError, match=r"row_mask with block_q=128 is not "
                                                    r"supported .* block_q <= 64"):
        fn(q, k, v, index, count, block_q=128, block_k=16, row_mask=index.long())


GPU_SHAPES = [(2, 1000, 1000, 4, 2, 128, 64, bk, 0.3) for bk in (64, 128)]
GPU_SHAPES += [(1, 777, 900, 4, 4, 64, bq, 64, 0.4) for bq in (16, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_gpu_row_mask_bf16(shape):
    check_masked(shape, torch.bfloat16, device="cuda", seed=2)


@pytest.mark.gpu
def test_gpu_row_mask_partial_key_blocks_bf16():
    check_masked((1, 1024, 1024, 4, 2, 128, 64, 64, 0.5), torch.bfloat16, valid=True,
                 device="cuda", seed=5)
