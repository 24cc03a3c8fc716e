"""The block-sparse kernel's Gluon backward on Hopper (gluon_bwd_sm90, switched by
options.GLUON_BACKWARD): where it serves (`usable`), the switch, the fallback to the Triton
backward when it does not compile, deterministic mode, and (gpu) dq, dk, dv against the float64
reference.

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
    cuda_like,
    fake_module,
    fresh_gluon_path,
    inputs,
    spy,
)
from tests.kernels.test_block_sparse_kernel import _grads as kernel_grads

_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture(autouse=True)
def fresh_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with both switch tables off, no Gluon module imported, and NaN-filled
    kernel outputs."""
    fresh_gluon_path(monkeypatch)


def _gluon():
    from attnrt.kernels.block_sparse import gluon_bwd_sm90

    return gluon_bwd_sm90


# --- the switch -------------------------------------------------------------------------------

def test_the_gluon_backward_ships_off_for_every_block_size():
    assert set(options.GLUON_BACKWARD) == set(map(tuple, BLOCKS))
    assert not any(options.gluon_backward_on(bq, bk) for bq, bk in BLOCKS)


def test_the_backward_switches_are_apart_from_the_forward_ones():
    with options.gluon_backward(blocks=[(64, 64)]):
        assert options.gluon_backward_on(64, 64)
        assert not options.gluon_forward_on(64, 64)
        assert not options.gluon_backward_on(128, 128)
        with options.gluon_forward():
            assert all(options.gluon_forward_on(bq, bk) for bq, bk in BLOCKS)
            assert not options.gluon_backward_on(128, 64)
    assert not options.gluon_backward_on(64, 64)
    options.set_gluon_backward(True, blocks=[(128, 128)])
    assert options.GLUON_BACKWARD[(128, 128)]
    assert not any(options.GLUON_FORWARD.values())
    with options.gluon_backward(False):
        assert not options.gluon_backward_on(128, 128)
    assert options.gluon_backward_on(128, 128)


def test_the_backward_switch_refuses_block_sizes_without_a_gluon_kernel():
    with pytest.raises(BlockSparseInputError, match=r"blocks=\(64, 128\).*Gluon backward"):
        options.set_gluon_backward(True, blocks=[(64, 128)])
    with pytest.raises(BlockSparseInputError, match=r"blocks=\(32, 32\)"), \
            options.gluon_backward(blocks=[(32, 32)]):
        pass
    assert not any(options.GLUON_BACKWARD.values())


# --- usable -----------------------------------------------------------------------------------

def test_usable_refuses_cpu_tensors_by_device():
    q, k, v, _, _ = inputs()
    assert "device=cpu" in _gluon().usable(q, k, v, q, None, None, 128, 64, False)


@pytest.mark.parametrize(("change", "reason"), [
    ({"bq": 64, "bk": 128}, "block_q=64, block_k=128 (supported: 128x128, 128x64, 64x64)"),
    ({"dtype": torch.float32}, "dtype=torch.float32 (supported: torch.float16, torch.bfloat16)"),
    ({"d": 96}, "head_size=96 (supported: 64, 128)"),
    ({"b": 2, "m": 200}, "B=2 with N=256, M=200 not multiples of block_q=128, block_k=64 "
                         "(a tile would cross batches)"),
    ({"b": 2, "n": 192}, "B=2 with N=192, M=256 not multiples of block_q=128, block_k=64 "
                         "(a tile would cross batches)"),
])
def test_usable_names_each_limit(monkeypatch, change, reason):
    gluon = _gluon()
    monkeypatch.setattr(gluon, "_device_reason", lambda q: None)
    args = {"b": 1, "n": 256, "m": 256, "d": 64, "bq": 128, "bk": 64, "dtype": torch.float16,
            **change}
    q, k, v, _, _ = inputs(**args)
    assert gluon.usable(q, k, v, q, None, None, args["bq"], args["bk"], False) == reason
    q, k, v, _, _ = inputs(n=1000, m=900)  # tails are fine with B = 1
    assert gluon.usable(q, k, v, q, None, None, 128, 64, False) is None


def test_usable_refuses_row_masks_deterministic_mode_and_what_tma_cannot_read(monkeypatch):
    gluon = _gluon()
    monkeypatch.setattr(gluon, "_device_reason", lambda q: None)
    q, k, v, index, _ = inputs(bq=64, bk=64)
    row_mask = torch.ones(index.shape, dtype=torch.int64)
    assert gluon.usable(q, k, v, q, None, row_mask, 64, 64, False) == \
        "row_mask is given (supported: None)"
    deterministic = "deterministic mode (dQ is summed by TMA reduce-adds in a varying order)"
    assert gluon.usable(q, k, v, q, None, None, 64, 64, True) == deterministic
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert gluon.usable(q, k, v, q, None, None, 64, 64, False) == deterministic
    finally:
        torch.use_deterministic_algorithms(previous)
    heads_first = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] view of BHND
    reason = gluon.usable(q, k, v, heads_first, None, None, 64, 64, False)
    assert reason.startswith("dout with shape (1, 256, 2, 64)")
    assert "cannot be read by TMA" in reason
    assert gluon.usable(q, k, v, q, None, None, 64, 64, False) is None


def test_usable_refuses_row_statistics_past_int32_offsets(monkeypatch):
    """lse2 and delta [B, H, NP] are addressed with 32-bit offsets in the kernel."""
    gluon = _gluon()
    monkeypatch.setattr(gluon, "_device_reason", lambda q: None)
    monkeypatch.setattr(gluon, "_tensor_reason", lambda *tensors: None)
    big = torch.empty(1, 1, 1, 64, dtype=torch.float16).expand(4096, 4096, 128, 64)  # no memory
    assert gluon.usable(big, big, big, big, None, None, 128, 128, False) == \
        "offsets past int32 (the transposed lists or the row statistics lse2, delta)"
    fits = big[:4095]
    assert gluon.usable(fits, fits, fits, fits, None, None, 128, 128, False) is None


# --- the path: switch, fallback, compile failure ----------------------------------------------

def test_the_path_is_not_looked_up_when_off_or_on_cpu(monkeypatch):
    def unexpected(kind="forward"):
        raise AssertionError("the Gluon module was looked up")

    monkeypatch.setattr(gluon_path, "module", unexpected)
    q, k, v, _, _ = inputs()
    assert not gluon_path.backward_usable(cuda_like(q), k, v, q, None, 128, 64, False)
    with options.gluon_backward():
        assert not gluon_path.backward_usable(q, k, v, q, None, 128, 64, False)  # CPU


def test_the_path_runs_the_kernel_where_switched_on_and_usable(monkeypatch):
    calls: list = []
    q, k, v, _, _ = inputs()
    monkeypatch.setattr(gluon_path.SWITCH, "loaded", {"backward": fake_module("backward", calls)})
    with options.gluon_backward(blocks=[(128, 64)]):
        assert gluon_path.backward_usable(cuda_like(q), k, v, q, None, 128, 64, False)
        assert not gluon_path.backward_usable(cuda_like(q), k, v, q, None, 128, 128, False)
    args = (q, k, v, q, "lse2", "delta", "k2q", "cnt", None, 128, 64, 0.5, "acc", "dk", "dv")
    assert gluon_path.backward(*args) is True
    assert calls == [args]
    monkeypatch.setattr(gluon_path.SWITCH, "loaded",
                        {"backward": fake_module("backward", calls, "dtype=...")})
    with options.gluon_backward():
        assert not gluon_path.backward_usable(cuda_like(q), k, v, q, None, 128, 64, False)
    assert gluon_path.backward(*args) is False
    assert len(calls) == 1


def test_a_backward_module_that_does_not_import_turns_only_it_off_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "attnrt.kernels.block_sparse.gluon_bwd_sm90", None)
    q, k, v, _, _ = inputs()
    with caplog.at_level("WARNING", logger="attnrt"), options.gluon_backward():
        for _ in range(2):
            assert not gluon_path.backward_usable(cuda_like(q), k, v, q, None, 128, 64, False)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "Gluon backward is off" in message
    assert "does not import" in message
    assert "forward" not in gluon_path.SWITCH.loaded


def test_a_compile_failure_turns_the_backward_off_once_and_runtime_errors_propagate(
        monkeypatch, caplog):
    from triton.compiler.errors import CompilationError

    q, k, v, _, _ = inputs()
    args = (q, k, v, q, None, None, None, None, None, 128, 64, 1.0, None, None, None)
    calls: list = []
    monkeypatch.setattr(gluon_path.SWITCH, "loaded", {"backward": fake_module("backward",
        calls, error=RuntimeError("CUDA error: an illegal memory access"))})
    with pytest.raises(RuntimeError, match="illegal memory access"):
        gluon_path.backward(*args)
    monkeypatch.setattr(gluon_path.SWITCH, "loaded", {"backward": fake_module("backward",
        calls, error=CompilationError(None, None, "simulated"))})
    with caplog.at_level("WARNING", logger="attnrt"):
        assert gluon_path.backward(*args) is False
        assert gluon_path.backward(*args) is False
    assert gluon_path.SWITCH.loaded["backward"] is None
    assert len(calls) == 2  # the call after the failure does not try again
    assert len(caplog.records) == 1
    assert "Gluon backward is off (compiling it failed" in caplog.records[0].getMessage()


def _grads_through(monkeypatch, serve: bool, deterministic: bool = False):
    """block_sparse_attention's gradients on CPU with the Gluon path replaced: it says it can
    serve and either fills dq_acc/dk/dv with 2/3/4 (serve) or reports a failure (False)."""
    seen: list = []

    def usable(q, k, v, dout, row_mask, bq, bk, det, switched_on=None):
        seen.append(det)
        return True

    def backward(q, k, v, dout, lse2, delta, k2q, cnt, valid, bq, bk, scale, acc, dk, dv):
        assert torch.equal(acc, torch.zeros_like(acc))
        assert acc.dtype == torch.float32
        if serve:
            acc.fill_(2.0)
            dk.fill_(3.0)
            dv.fill_(4.0)
        return serve

    monkeypatch.setattr(gluon_path, "backward_usable", usable)
    monkeypatch.setattr(gluon_path, "backward", backward)
    q, k, v, index, count = (t.requires_grad_() if t.is_floating_point() else t
                             for t in inputs(n=128, m=128, bq=64, bk=64))
    out = block_sparse_attention(q, k, v, index, count, block_q=64, block_k=64,
                                 deterministic=deterministic)
    out.sum().backward()
    return seen, (q.grad, k.grad, v.grad)


def test_the_backward_follows_the_switch_the_forward_saw(monkeypatch):
    """A CUDA backward runs on autograd's device thread, where the forward's `with
    gluon_backward()` scope is not visible (the H200 run served no Gluon backward that way):
    the forward records the switch for its backward."""
    seen = []

    def usable(q, k, v, dout, row_mask, bq, bk, det, switched_on=None):
        seen.append(switched_on)
        return False

    monkeypatch.setattr(gluon_path, "backward_usable", usable)
    q, k, v, index, count = (t.requires_grad_() if t.is_floating_point() else t
                             for t in inputs(n=128, m=128, bq=64, bk=64))
    with options.gluon_backward(blocks=[(64, 64)]):
        inside = block_sparse_attention(q, k, v, index, count, block_q=64, block_k=64)
    outside = block_sparse_attention(q, k, v, index, count, block_q=64, block_k=64)
    with options.gluon_backward(blocks=[(64, 64)]):
        outside.sum().backward()
    inside.sum().backward()
    assert seen == [False, True]


@pytest.mark.interpret
def test_launch_returns_the_gluon_gradients_when_the_path_serves(monkeypatch):
    def no_triton(*args, **kwargs):
        raise AssertionError("a Triton backward kernel ran")

    monkeypatch.setattr(bs_launch, "launch_dq", no_triton)
    monkeypatch.setattr(bs_launch, "launch_dkdv", no_triton)
    seen, (dq, dk, dv) = _grads_through(monkeypatch, serve=True)
    assert seen == [False]
    assert dq.dtype == torch.float16
    assert torch.equal(dq, torch.full_like(dq, 2.0))
    assert torch.equal(dk, torch.full_like(dk, 3.0))
    assert torch.equal(dv, torch.full_like(dv, 4.0))


@pytest.mark.interpret
def test_launch_runs_the_triton_backward_where_the_path_declines(monkeypatch):
    """A failed Gluon launch (compile failure) leaves the Triton kernels to write every
    gradient; the API's deterministic flag reaches the path's check."""
    seen, grads = _grads_through(monkeypatch, serve=False, deterministic=True)
    assert seen == [True]
    for g in grads:
        assert torch.isfinite(g).all()
        assert not torch.equal(g, torch.full_like(g, 3.0))


# --- gpu: against the float64 reference -------------------------------------------------------

def _lists(b, h, nqb, nkb, density, gen):
    """Random lists with fixed oddities: query block 0 of head 0 visits nothing; key blocks 1
    and nkb - 2 are visited by nobody (their dK, dV must be exactly 0); for 64-key blocks,
    key block 2's list is all query blocks and key block 3's one (a pair with lists of very
    different lengths)."""
    mask = torch.rand(b, h, nqb, nkb, generator=gen) < density
    mask[0, 0, 0] = False
    mask[..., 1] = False
    mask[..., nkb - 2] = False
    if nkb >= 6:
        mask[..., 2] = True
        mask[..., 3] = False
        mask[..., nqb - 1, 3] = True
    mask[-1, -1, -1, 0] = True
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
        kv[2] = cap[2] // 2 + 1
        kv = kv.cuda()
    return q, k, v, index.cuda(), count.cuda(), kv


def _grads(fn, q, k, v, index, count, bq, bk, kv, seed):
    """(dq, dk, dv) against seeded dout and dlse, as the Triton kernel's tests take them."""
    return kernel_grads(fn, q, k, v, index, count, bq, bk, kv, seed)[2]


def _check(case, bq, bk, dtype, seed=1):
    q, k, v, index, count, kv = case
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with options.gluon_backward(blocks=[(bq, bk)]):
        grads = _grads(block_sparse_attention, q, k, v, index, count, bq, bk, kv, seed)
    ref = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    r_grads = _grads(block_sparse_attention_reference, *ref, index.cpu(), count.cpu(), bq, bk,
                     None if kv is None else kv.cpu(), seed)
    for name, g, r in zip("qkv", grads, r_grads, strict=True):
        assert rel_l2(g, r) < TOLERANCE[dtype], name
    for g in grads[1:]:  # key blocks 1 and NKB - 2 are visited by nobody
        for kb in (1, -(-k.shape[1] // bk) - 2):
            block = g[:, kb * bk:(kb + 1) * bk]
            assert torch.equal(block, torch.zeros_like(block))


# (B, N, M, H, Hkv, block_q, block_k, key_block_valid)
GPU_CASES = [
    (1, 1000, 1000, 4, 2, 128, 128, False),  # tail N and M, GQA
    (2, 1024, 1024, 4, 2, 128, 128, True),   # B > 1, partial key blocks
    (1, 777, 900, 4, 4, 128, 64, False),
    (2, 1024, 1024, 2, 1, 128, 64, True),
    (1, 900, 1000, 4, 2, 64, 64, False),     # odd NKB: the last pair has one block
    (2, 1024, 1024, 4, 2, 64, 64, True),
    (1, 640, 448, 2, 1, 64, 64, True),       # odd NKB with partial blocks
]


@pytest.mark.gpu
@pytest.mark.skipif(not _SM90, reason="the Gluon backward is built for sm90")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_gluon_backward_matches_reference(case, d, dtype, monkeypatch):
    b, n, m, h, hkv, bq, bk, valid = case
    calls = spy(monkeypatch, "backward")
    _check(_gpu_case(b, n, m, h, hkv, d, bq, bk, dtype, valid), bq, bk, dtype)
    assert calls == [1]  # the Gluon kernel ran, not the Triton fallback


@pytest.mark.gpu
@pytest.mark.skipif(not _SM90, reason="the Gluon backward is built for sm90")
def test_gpu_what_gluon_cannot_serve_runs_the_triton_backward(monkeypatch):
    """B > 1 with N not a multiple of block_q, and deterministic mode: the Triton backward
    serves, the gradients are still the reference's."""
    calls = spy(monkeypatch, "backward")
    _check(_gpu_case(2, 500, 1024, 2, 1, 128, 128, 64, torch.bfloat16, False), 128, 64,
           torch.bfloat16)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _check(_gpu_case(1, 512, 512, 2, 1, 128, 64, 64, torch.bfloat16, False), 64, 64,
               torch.bfloat16)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert calls == []
