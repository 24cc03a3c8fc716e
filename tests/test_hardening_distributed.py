"""Hardening (issue 18): one rank's bad input raises on every rank, never leaves the others waiting.

Before the fix a float8 q on one rank escaped as a TypeError before the shape check, and
original_seq_len=16.0 on one rank with None on another passed it (every non-int mapped to one
value), so the peers hung in a collective. The checks run on 2 gloo ranks spawned by
tests/dist_worker.run_world, whose every wait is bounded (a hang fails the test).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attnrt.parallel.groups import ShardError, ShardMismatchError
from attnrt.parallel.layers import DistributedAttention
from tests import dist_worker
from tests.dist_worker import Ctx, qkv

_ORIGINAL_WORKER = dist_worker._worker


def check_float8_on_one_rank(ctx: Ctx) -> None:
    h = 2 * ctx.world
    layer = DistributedAttention(h, 16)
    q, k, v = qkv(ctx, 1, 8, h, h, 16, seed=2)
    bad = [t.to(torch.float8_e4m3fn) for t in (q, k, v)] if ctx.rank == 0 else [q, k, v]
    with pytest.raises(ShardMismatchError, match=r"q.dtype differs \(rank 0: another dtype"):
        layer(*bad)
    out, _ = layer(q, k, v)  # the group is still in step after the refusal
    assert out.shape == q.shape


def check_float8_on_every_rank(ctx: Ctx) -> None:
    h = 2 * ctx.world
    q, k, v = (t.to(torch.float8_e4m3fn) for t in qkv(ctx, 1, 8, h, h, 16, seed=2))
    with pytest.raises(ShardError, match=r"q.dtype=torch.float8_e4m3fn is not allowed"):
        DistributedAttention(h, 16)(q, k, v)


def check_original_seq_len_of_another_type_on_one_rank(ctx: Ctx) -> None:
    h = 2 * ctx.world
    layer = DistributedAttention(h, 16)
    q, k, v = qkv(ctx, 1, 8, h, h, 16, seed=2)
    for bad in (16.0, True, "16"):
        mine = bad if ctx.rank == 0 else None
        with pytest.raises(ShardMismatchError,
                           match=r"original_seq_len differs \(rank 0: not an int, rank 1: None"):
            layer(q, k, v, original_seq_len=mine)
    mine = 16.0 if ctx.rank == 0 else 16
    with pytest.raises(ShardMismatchError, match=r"rank 0: not an int, rank 1: 16"):
        layer(q, k, v, original_seq_len=mine)
    with pytest.raises(ShardError, match=r"original_seq_len=16.0 is not allowed"):
        layer(q, k, v, original_seq_len=16.0)  # alike on every rank: check_inputs refuses it
    out, _ = layer(q, k, v, original_seq_len=15)
    assert out.shape == q.shape


HARDENING_CHECKS = {name[len("check_"):]: fn for name, fn in globals().items()
                    if name.startswith("check_")}


def _hardening_worker(*args: Any) -> None:
    """dist_worker's rank body, with this file's checks added (runs in the spawned rank)."""
    dist_worker.CHECKS.update(HARDENING_CHECKS)
    _ORIGINAL_WORKER(*args)


@pytest.mark.distributed
def test_bad_input_on_one_rank_raises_on_every_rank_of_a_gloo_group(monkeypatch) -> None:
    monkeypatch.setattr(dist_worker, "_worker", _hardening_worker)
    results = dist_worker.run_world(2, sorted(HARDENING_CHECKS), backend="gloo", timeout=90)
    failures = [f"--- {name} on rank {rank}:\n{verdict}" for name, by_rank in results.items()
                for rank, verdict in by_rank.items() if verdict != "ok"]
    assert not failures, "\n".join(failures)
