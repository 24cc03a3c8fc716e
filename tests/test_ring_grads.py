"""Each ring piece's backward: TRITON_FLASH_ATTN's kernels and the torch formula, against each
other and against single-process attention.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) at tiny fp32/fp16 shapes;
the gpu-marked cases run them compiled, in bf16 too, inside the ring on CUDA streams.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import attnrt
from attnrt.kernels.flash import launch as tf
from attnrt.parallel.ring_grads import (
    PieceBackwardError,
    choose_piece_backward,
    torch_backward,
    triton_backward,
)
from tests.helpers import dense_reference
from tests.ring_streams import ring_on_threads

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    attnrt.clear_caches()
    yield
    attnrt.clear_caches()


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every kernel buffer starts as NaN, so an element the kernel never wrote fails the test."""
    made: list[torch.Tensor] = []

    def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = torch.full(shape, float("nan"), dtype=dtype, device=device)
        made.append(t)
        return t

    monkeypatch.setattr(tf, "_alloc", alloc)
    return made


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got64).all():
        return float("inf")
    return ((got64 - want64).norm() / want64.norm()).item()


def _whole(b: int, n: int, m: int, h: int, hkv: int, d: int, causal: bool) -> tuple:
    """q [B, n, H, D] over the keys [B, m, Hkv, D] split at m // 2 into two pieces (a, b);
    float64 out, lse of the whole key set and autograd's gradients for a random dout."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, x, y, d, generator=gen, dtype=torch.float64)
               for x, y in ((n, h), (m, hkv), (m, hkv)))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = dense_reference(*leaves, causal)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * dout).sum().backward()
    g = h // hkv
    s = torch.einsum("bnhd,bmhd->bhnm", q, k.repeat_interleave(g, 2)) * d ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(m - n + 1), float("-inf"))
    lse = s.logsumexp(-1)  # [B, H, n]
    return (q, k, v, out.detach(), dout, lse), [t.grad for t in leaves]


@pytest.mark.interpret
@pytest.mark.parametrize(("dtype", "causal", "heads"), [
    (torch.float32, False, (4, 2)), (torch.float16, False, (2, 2)), (torch.float32, True, (4, 1))])
def test_kernel_piece_backward_equals_the_torch_formula_and_sums_to_the_whole(
        poisoned: list[torch.Tensor], dtype: torch.dtype, causal: bool,
        heads: tuple[int, int]) -> None:
    """Two key pieces, each with the whole set's out and lse: the kernel's dq/dk/dv equal the
    float64 torch formula's per piece, dk/dv equal the whole gradients' slices, and the two dq
    sum to the whole dq. Causal: the second piece is the aligned diagonal (n == its m)."""
    h, hkv = heads
    n, m, d = 24, 48, 32
    (q, k, v, out, dout, lse), whole = _whole(1, n, m, h, hkv, d, causal)
    if causal:
        assert n == m - n  # keys [0, 24) come wholly before the queries, [24, 48) the diagonal
    delta = (dout * out).sum(-1).transpose(1, 2)
    scale = d ** -0.5
    ref, kern = torch_backward(scale), triton_backward(scale, None)
    dq_sum = torch.zeros_like(q)
    for i, part in enumerate((slice(0, m // 2), slice(m // 2, m))):
        diag = causal and i == 1
        want = ref.grads(q, k[:, part], v[:, part], out, dout, lse, delta, diag)
        got = kern.grads(*(t.to(DEVICE, dtype) for t in (q, k[:, part], v[:, part], out, dout)),
                         lse.to(DEVICE, torch.float32), None, diag)
        assert all(t.dtype == dtype for t in got)
        for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
            assert _rel(g, w) < TOL[dtype], (name, i, _rel(g, w))
        assert _rel(want[1], whole[1][:, part]) < 1e-12
        assert _rel(want[2], whole[2][:, part]) < 1e-12
        dq_sum += got[0].double().cpu()
    assert _rel(dq_sum, whole[0]) < TOL[dtype]
    assert poisoned  # the kernel's buffers were the NaN-filled ones


@pytest.mark.interpret
@pytest.mark.parametrize(("size", "layout", "causal"), [(2, "zigzag", True),
                                                        (2, "contiguous", False)])
def test_ring_with_kernel_piece_backward_matches_dense_attention(
        size: int, layout: str, causal: bool) -> None:
    """The whole ring (threads as ranks, replicated tokens, padding, GQA) with every piece's
    backward through the kernel: outputs and gradients equal float64 single-process attention."""
    errs = ring_on_threads(size, layout, causal, DEVICE, torch.float32, valid=9, rep=3,
                           backward="triton", d=32)
    assert max(errs) < 1e-5, errs


def test_auto_picks_the_kernel_only_where_triton_flash_attn_serves() -> None:
    q, k = torch.randn(1, 4, 4, 32), torch.randn(1, 4, 2, 32)
    cpu = choose_piece_backward("auto", q, k, True, 0.1)
    assert cpu.name == "torch"
    assert "platform=cpu is not supported by TRITON_FLASH_ATTN" in cpu.reason
    q, k = q.to(DEVICE), k.to(DEVICE)  # where the kernel can run (interpreted on CPU)
    assert choose_piece_backward("torch", q, k, True, 0.1).name == "torch"
    with pytest.raises(PieceBackwardError, match="piece_backward='fast' is not allowed; "
                                                 "allowed: 'auto', 'torch', 'triton'"):
        choose_piece_backward("fast", q, k, True, 0.1)
    with pytest.raises(PieceBackwardError, match=r"'triton' cannot run here: head_size=8"):
        choose_piece_backward("triton", q[..., :8], k[..., :8], True, 0.1)
    with pytest.raises(PieceBackwardError, match=r"'triton' cannot run here: q.dtype="
                                                 r"torch.float64"):
        choose_piece_backward("triton", q.double(), k.double(), True, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ring_piece_backward_kernel_and_torch_agree_on_cuda(dtype: torch.dtype) -> None:
    """On a GPU "auto" runs the kernel; the ring on CUDA streams gives the same outputs and
    gradients with either piece backward, both within the dtype's bound of float64 attention."""
    q, k = (torch.randn(1, 8, x, 64, device="cuda", dtype=dtype) for x in (4, 2))
    chosen = choose_piece_backward("auto", q, k, True, 0.125)
    assert chosen.name == "triton", chosen.reason
    for backward in ("auto", "torch"):
        errs = ring_on_threads(4, "zigzag", True, "cuda", dtype, valid=61, rep=3,
                               backward=backward, d=64)
        assert max(errs) < TOL[dtype], (backward, errs)


def test_kernel_backward_refuses_out_and_lse_that_do_not_fit_q() -> None:
    q, k, v = (torch.randn(1, 4, 2, 32, device=DEVICE) for _ in range(3))
    lse = torch.zeros(1, 2, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"out=\(1, 3, 2, 32\) torch.float32 is not supported"):
        tf.flash_attention_backward(q, k, v, q[:, :3], lse, q)
    with pytest.raises(ValueError, match=r"dout=\(1, 4, 2, 32\) torch.float16"):
        tf.flash_attention_backward(q, k, v, q, lse, q.half())
    with pytest.raises(ValueError, match=r"lse.shape=\(1, 4, 2\) is not supported .* expected "
                                         r"\[B, H, N\] = \(1, 2, 4\)"):
        tf.flash_attention_backward(q, k, v, q, lse.transpose(1, 2), q)


def test_a_kernel_that_fails_to_compile_leaves_the_piece_to_the_torch_formula(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Logged, the same gradients from the torch formula; under ATTNRT_STRICT=1 it raises."""
    from triton.runtime.errors import OutOfResources

    def no_room(*args: object, **kwargs: object) -> None:
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(tf, "flash_attention_backward", no_room)
    (q, k, v, out, dout, lse), _ = _whole(1, 8, 16, 2, 2, 32, False)
    delta = (dout * out).sum(-1).transpose(1, 2)
    want = torch_backward(0.2).grads(q, k, v, out, dout, lse, delta, False)
    with caplog.at_level("WARNING", logger="attnrt"):
        got = triton_backward(0.2, None).grads(q, k, v, out, dout, lse, delta, False)
    assert "the torch formula serves this piece" in caplog.text
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    monkeypatch.setenv("ATTNRT_STRICT", "1")
    with pytest.raises(OutOfResources):
        triton_backward(0.2, None).grads(q, k, v, out, dout, lse, delta, False)
