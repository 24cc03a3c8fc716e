"""Helpers shared by the block-sparse Gluon forward and backward tests
(test_block_sparse_gluon.py, test_block_sparse_gluon_bwd.py).

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head size.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from attnrt.kernels.block_sparse import block_mask_to_index, gluon_path, options
from attnrt.kernels.block_sparse import launch as bs_launch

BLOCKS = [(128, 128), (128, 64), (64, 64)]  # (block_q, block_k) with Gluon kernels
SHIPPED = {"forward": dict(options.GLUON_FORWARD), "backward": dict(options.GLUON_BACKWARD)}


def fresh_gluon_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both switch tables off (tests turn on what they use), no Gluon module imported yet,
    and every kernel output NaN-filled (so an element the kernel never wrote fails a test),
    undone after the test."""
    monkeypatch.setattr(options, "GLUON_FORWARD", dict.fromkeys(options.GLUON_FORWARD, False))
    monkeypatch.setattr(options, "GLUON_BACKWARD", dict.fromkeys(options.GLUON_BACKWARD, False))
    monkeypatch.setattr(gluon_path.SWITCH, "loaded", {})
    monkeypatch.setattr(bs_launch, "_alloc", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))


def inputs(b=1, n=256, m=256, h=2, hkv=1, d=64, bq=128, bk=64, dtype=torch.float16,
           device="cpu"):
    """q [B, N, H, D], k and v [B, M, Hkv, D] random, and the lists (index, count) of a full
    block mask."""
    q = torch.randn(b, n, h, d, dtype=dtype, device=device)
    k = torch.randn(b, m, hkv, d, dtype=dtype, device=device)
    nqb, nkb = -(-n // bq), -(-m // bk)
    index, count = block_mask_to_index(torch.ones(b, h, nqb, nkb, dtype=torch.bool))
    return q, k, k.clone(), index.to(device), count.to(device)


def cuda_like(q):
    """A stand-in for q that says it is on CUDA (for the path's switch checks on CPU)."""
    return SimpleNamespace(is_cuda=True, shape=q.shape)


def fake_module(kind: str, calls: list, reason=None, error: BaseException | None = None):
    """A Gluon module of `kind` ("forward" or "backward") whose `usable` answers `reason` and
    whose kernel function records its arguments in `calls`, then raises `error` if given."""
    def run(*args):
        calls.append(args)
        if error is not None:
            raise error

    return SimpleNamespace(usable=lambda *a: reason, **{kind: run})


def spy(monkeypatch: pytest.MonkeyPatch, kind: str) -> list[int]:
    """Counts the real Gluon `kind` kernel's launches (one entry per call)."""
    gluon = gluon_path.module(kind)
    assert gluon is not None, f"the GPU machine's Triton should import the Gluon {kind}"
    calls: list[int] = []
    real = getattr(gluon, kind)
    monkeypatch.setattr(gluon, kind, lambda *a: calls.append(1) or real(*a))
    return calls
