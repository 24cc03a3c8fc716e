"""The block-sparse kernel's Gluon forward on Hopper (gluon_fwd_sm90, switched by
options.GLUON_FORWARD): where it serves (`usable`), the switch, the fallback to the Triton
forward when it does not compile, and (gpu) its results against the float64 reference.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size.
"""

from __future__ import annotations

import sys

import pytest
import torch

from attnrt.kernels.block_sparse import (
    BlockSparseInputError,
    block_mask_to_index,
    block_sparse_attention,
    block_sparse_attention_reference,
    gluon_path,
    options,
)
from attnrt.kernels.block_sparse import launch as bs_launch
from tests.conftest import TOLERANCE, rel_l2
from tests.kernels.block_sparse_gluon_helpers import (
    BLOCKS,
    SHIPPED,
    cuda_like,
    fake_module,
    fresh_gluon_path,
    inputs,
    spy,
)


@pytest.fixture(autouse=True)
def fresh_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with both switch tables off, no Gluon module imported, and NaN-filled
    kernel outputs."""
    fresh_gluon_path(monkeypatch)


def _gluon():
    from attnrt.kernels.block_sparse import gluon_fwd_sm90

    return gluon_fwd_sm90


# --- the switch -------------------------------------------------------------------------------

def test_the_shipped_switches_are_the_measured_ones():
    """bench/NOTES-sparse.md run 5 (H100): the Gluon forward 1.20-1.38x the Triton one at
    every block size; the Gluon backward 1.45x at 128x128, 1.06x at 128x64, 1.00x at 64x64."""
    assert SHIPPED["forward"] == dict.fromkeys(map(tuple, BLOCKS), True)
    assert SHIPPED["backward"] == {(128, 128): True, (128, 64): True, (64, 64): False}
    assert not any(options.gluon_forward_on(bq, bk) for bq, bk in BLOCKS)  # this fixture's


def test_the_scoped_switch_turns_on_only_within_its_block_and_only_what_it_names():
    with options.gluon_forward(blocks=[(64, 64)]):
        assert options.gluon_forward_on(64, 64)
        assert not options.gluon_forward_on(128, 128)
        with options.gluon_forward():
            assert all(options.gluon_forward_on(bq, bk) for bq, bk in BLOCKS)
            with options.gluon_forward(False, blocks=[(128, 64)]):
                assert not options.gluon_forward_on(128, 64)
                assert options.gluon_forward_on(128, 128)
        assert not options.gluon_forward_on(128, 128)
    assert not options.gluon_forward_on(64, 64)
    assert not options.gluon_forward_on(64, 128)  # a size without a Gluon kernel


def test_the_process_switch_sets_the_table():
    options.set_gluon_forward(True, blocks=[(128, 128)])
    assert options.GLUON_FORWARD[(128, 128)]
    assert not options.GLUON_FORWARD[(64, 64)]
    options.set_gluon_forward(True)
    assert all(options.GLUON_FORWARD.values())
    with options.gluon_forward(False):
        assert not options.gluon_forward_on(128, 128)
    assert options.gluon_forward_on(128, 128)


def test_the_switch_refuses_block_sizes_without_a_gluon_kernel():
    with pytest.raises(BlockSparseInputError, match=r"blocks=\(64, 128\).*supported"):
        options.set_gluon_forward(True, blocks=[(64, 128)])
    with pytest.raises(BlockSparseInputError, match=r"blocks=\(32, 32\)"), \
            options.gluon_forward(blocks=[(32, 32)]):
        pass
    assert not any(options.GLUON_FORWARD.values())


# --- usable -----------------------------------------------------------------------------------

def test_usable_refuses_cpu_tensors_by_device():
    q, k, v, index, count = inputs()
    assert "device=cpu" in _gluon().usable(q, k, v, index, count, None, 128, 64)


@pytest.mark.parametrize(("change", "reason"), [
    ({"bq": 64, "bk": 128}, "block_q=64, block_k=128 (supported: 128x64, 128x128, 64x64)"),
    ({"dtype": torch.float32}, "dtype=torch.float32 (supported: torch.float16, torch.bfloat16)"),
    ({"d": 96}, "head_size=96 (supported: 64, 128)"),
    ({"b": 2, "m": 200}, "B=2 with M=200 not a multiple of block_k=64"),
])
def test_usable_names_each_limit(monkeypatch, change, reason):
    gluon = _gluon()
    monkeypatch.setattr(gluon, "_device_reason", lambda q: None)
    args = {"b": 1, "m": 256, "d": 64, "bq": 128, "bk": 64, "dtype": torch.float16, **change}
    q, k, v, index, count = inputs(**args)
    assert gluon.usable(q, k, v, index, count, None, args["bq"], args["bk"]) == reason
    fine = inputs()
    assert gluon.usable(*fine, None, 128, 64) is None


def test_usable_refuses_row_masks_and_tensors_tma_cannot_read(monkeypatch):
    gluon = _gluon()
    monkeypatch.setattr(gluon, "_device_reason", lambda q: None)
    q, k, v, index, count = inputs(bq=64, bk=64)
    row_mask = torch.ones(index.shape, dtype=torch.int64)
    assert gluon.usable(q, k, v, index, count, row_mask, 64, 64) == \
        "row_mask is given (supported: None)"
    heads_first = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] view of BHND
    reason = gluon.usable(heads_first, k, v, index, count, None, 64, 64)
    assert reason.startswith("q with shape (1, 256, 2, 64)")
    assert "cannot be read by TMA" in reason
    assert gluon.usable(q, k, v, index, count, None, 64, 64) is None


# --- the path: switch, fallback, compile failure ----------------------------------------------

def test_the_path_is_not_looked_up_when_off_or_on_cpu(monkeypatch):
    def unexpected():
        raise AssertionError("the Gluon module was looked up")

    monkeypatch.setattr(gluon_path, "module", unexpected)
    q, k, v, index, count = inputs()
    assert gluon_path.forward(cuda_like(q), k, v, index, count, None, None, 128, 64, 1.0,
                              None, None) is False  # switched off
    with options.gluon_forward():
        assert gluon_path.forward(q, k, v, index, count, None, None, 128, 64, 1.0, None,
                                  None) is False  # CPU tensors


def test_the_path_runs_the_kernel_where_switched_on_and_usable(monkeypatch):
    calls: list = []
    q, k, v, index, count = inputs()
    monkeypatch.setattr(gluon_path.SWITCH, "loaded", {"forward": fake_module("forward", calls)})
    args = (cuda_like(q), k, v, index, count, None, None, 128, 64, 0.5, "out", "lse")
    with options.gluon_forward(blocks=[(128, 64)]):
        assert gluon_path.forward(*args) is True
    assert calls == [(args[0], k, v, index, count, None, 128, 64, 0.5, "out", "lse")]
    monkeypatch.setattr(gluon_path.SWITCH, "loaded",
                        {"forward": fake_module("forward", calls, "dtype=...")})
    with options.gluon_forward():
        assert gluon_path.forward(*args) is False
    assert len(calls) == 1


def test_a_module_that_does_not_import_turns_the_path_off_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "attnrt.kernels.block_sparse.gluon_fwd_sm90", None)
    q, k, v, index, count = inputs()
    with caplog.at_level("WARNING", logger="attnrt"), options.gluon_forward():
        for _ in range(2):
            assert gluon_path.forward(cuda_like(q), k, v, index, count, None, None, 128, 64,
                                      1.0, None, None) is False
    assert [r.getMessage() for r in caplog.records if "Gluon forward is off" in r.getMessage()
            and "does not import" in r.getMessage()]
    assert len(caplog.records) == 1


def test_a_compile_failure_turns_the_path_off_once_and_runtime_errors_propagate(monkeypatch,
                                                                               caplog):
    from triton.compiler.errors import CompilationError

    q, k, v, index, count = inputs()
    args = (cuda_like(q), k, v, index, count, None, None, 128, 64, 1.0, None, None)
    calls: list = []
    monkeypatch.setattr(gluon_path.SWITCH, "loaded", {"forward": fake_module("forward",
        calls, error=RuntimeError("CUDA error: an illegal memory access"))})
    with options.gluon_forward(), pytest.raises(RuntimeError, match="illegal memory access"):
        gluon_path.forward(*args)
    monkeypatch.setattr(gluon_path.SWITCH, "loaded", {"forward": fake_module("forward",
        calls, error=CompilationError(None, None, "simulated"))})
    with caplog.at_level("WARNING", logger="attnrt"), options.gluon_forward():
        assert gluon_path.forward(*args) is False
        assert gluon_path.forward(*args) is False
    assert gluon_path.SWITCH.loaded["forward"] is None
    assert len(calls) == 2  # the second call after the failure does not try again
    assert len(caplog.records) == 1
    assert "compiling it failed" in caplog.records[0].getMessage()


def test_launch_takes_the_gluon_result_when_the_path_serves(monkeypatch):
    """launch._forward returns what the Gluon path wrote and runs no Triton kernel then."""
    def serve(q, k, v, index, count, valid, row_mask, bq, bk, scale, out, lse):
        out.fill_(2.0)
        lse.fill_(3.0)
        return True

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton forward ran")

    monkeypatch.setattr(gluon_path, "forward", serve)
    monkeypatch.setattr(bs_launch, "_with_plan", no_triton)
    q, k, v, index, count = inputs()
    out, lse = block_sparse_attention(q, k, v, index, count, block_q=128, block_k=64,
                                      return_lse=True)
    assert torch.equal(out, torch.full_like(out, 2.0))
    assert torch.equal(lse, torch.full_like(lse, 3.0))


# --- gpu: against the float64 reference -------------------------------------------------------

def _lists(b, h, nqb, nkb, density, gen):
    """Random lists with fixed oddities: query block 0 of head 0 visits nothing; for 64-row
    blocks, pairs (2, 3) and (4, 5) get lists of very different lengths (empty / all, all /
    one)."""
    mask = torch.rand(b, h, nqb, nkb, generator=gen) < density
    mask[0, 0, 0] = False
    mask[-1, -1, -1, 0] = True  # (with h > 1) some row attends something
    if nqb >= 6:
        mask[:, :, 2] = False
        mask[:, :, 3] = True
        mask[:, :, 4] = True
        mask[:, :, 5] = False
        mask[:, :, 5, nkb - 1] = True  # the tail block alone
    return block_mask_to_index(mask)


def _gpu_case(b, n, m, h, hkv, d, bq, bk, dtype, valid, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, length, heads, d, generator=gen).to(dtype).cuda()
               for length, heads in ((n, h), (m, hkv), (m, hkv)))
    nqb, nkb = -(-n // bq), -(-m // bk)
    index, count = _lists(b, h, nqb, nkb, 0.3, gen)
    kv = None
    if valid:
        cap = (m - torch.arange(nkb) * bk).clamp(max=bk)
        kv = (torch.rand(nkb, generator=gen) * (cap + 1)).long().clamp(max=cap).int()
        kv[0] = 0  # a listed block with no valid key
        kv[1] = cap[1]
        kv = kv.cuda()
    return q, k, v, index.cuda(), count.cuda(), kv


def _check(case, bq, bk, dtype, seed=1):
    q, k, v, index, count, kv = case
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with options.gluon_forward(blocks=[(bq, bk)]):
        out, lse = block_sparse_attention(q, k, v, index, count, block_q=bq, block_k=bk,
                                          key_block_valid=kv, return_lse=True)
    ref = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = block_sparse_attention_reference(
        *ref, index.cpu(), count.cpu(), block_q=bq, block_k=bk,
        key_block_valid=None if kv is None else kv.cpu(), return_lse=True)
    tol = TOLERANCE[dtype]
    assert rel_l2(out, r_out) < tol
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(r_lse))
    fin = torch.isfinite(r_lse)
    assert rel_l2(lse.cpu()[fin], r_lse[fin]) < tol
    empty = torch.isneginf(r_lse).transpose(1, 2)  # [B, N, H]
    assert torch.equal(out.cpu()[empty], torch.zeros_like(out.cpu()[empty]))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.device, out.dtype))
    r_grads = torch.autograd.grad(r_out, ref, dout.double())
    for name, g, r in zip("qkv", grads, r_grads, strict=True):
        assert rel_l2(g, r) < 2 * tol, name  # the Triton backward on the Gluon out and lse


# (B, N, M, H, Hkv, block_q, block_k, key_block_valid)
GPU_CASES = [
    (1, 1000, 1000, 4, 2, 128, 128, False),  # tail N and M, GQA
    (2, 1000, 1024, 4, 2, 128, 128, True),   # B > 1, partial key blocks
    (1, 777, 900, 4, 4, 128, 64, False),
    (2, 1000, 1024, 2, 1, 128, 64, True),
    (1, 900, 1000, 4, 2, 64, 64, False),     # odd NQB: the last pair has one block
    (2, 1000, 1024, 4, 2, 64, 64, True),
    (1, 64, 64, 2, 1, 64, 64, False),        # one query block: its partner is past N
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability() != (9, 0),
                    reason="the Gluon forward is built for sm90")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_gluon_forward_matches_reference(case, d, dtype, monkeypatch):
    b, n, m, h, hkv, bq, bk, valid = case
    calls = spy(monkeypatch, "forward")
    _check(_gpu_case(b, n, m, h, hkv, d, bq, bk, dtype, valid), bq, bk, dtype)
    assert calls == [1]  # the Gluon kernel ran, not the Triton fallback


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability() != (9, 0),
                    reason="the Gluon forward is built for sm90")
def test_gpu_what_gluon_cannot_read_runs_the_triton_forward(monkeypatch):
    """B > 1 with M not a multiple of block_k (a tail tile would read the next batch): usable
    refuses, the Triton forward serves, the result is still the reference's."""
    calls = spy(monkeypatch, "forward")
    _check(_gpu_case(2, 500, 1000, 2, 1, 128, 128, 64, torch.bfloat16, False), 128, 64,
           torch.bfloat16)
    assert calls == []
