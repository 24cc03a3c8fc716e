"""DistributedAttention (Ulysses sequence parallelism): gloo on CPU, NCCL on 2 GPUs, size one.

The multi-process checks live in tests/dist_worker.py; each world (2 and 4 gloo ranks) is spawned
once and runs every check there, because process start dominates on small CI machines.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import attnrt
from attnrt.layers import LocalAttention
from attnrt.parallel.groups import (
    SequenceParallel,
    SequenceParallelError,
    ShardError,
    clear_sequence_parallel,
    get_sequence_parallel,
    init_sequence_parallel,
    set_sequence_parallel,
)
from attnrt.parallel.layers import DistributedAttention, shard_heads
from tests.dist_worker import CHECKS, count_collectives, run_world


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    attnrt.clear_caches()
    clear_sequence_parallel()
    yield
    clear_sequence_parallel()
    attnrt.clear_caches()


def _failures(results: dict[str, dict[int, str]]) -> str:
    lines = []
    for name, by_rank in results.items():
        for rank, verdict in by_rank.items():
            if verdict != "ok" and not verdict.startswith("skip"):
                lines.append(f"--- {name} on rank {rank}:\n{verdict}")
    return "\n".join(lines)


@pytest.mark.distributed
@pytest.mark.parametrize(("world", "start"), [(2, "launcher"), (4, "gloo")])
def test_every_check_passes_on_every_gloo_rank(world: int, start: str) -> None:
    """Outputs and gradients equal LocalAttention on the gathered sequence (fp32, 1e-5), for plain,
    causal, GQA (also fewer kv heads than ranks), replicated tokens, padding, rotary, overlap
    chunks, pairwise exchange, hooks and VSA's gate; every error case raises on every rank.
    The 2-rank world starts as torchrun leaves ranks: environment only, no process group."""
    results = run_world(world, sorted(CHECKS), backend=start)
    assert set(results) == set(CHECKS)
    failures = _failures(results)
    assert not failures, failures


@pytest.mark.gpu
@pytest.mark.distributed
def test_every_check_passes_on_two_gpus_with_nccl_in_bf16() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs; found {torch.cuda.device_count()}")
    results = run_world(2, sorted(CHECKS), backend="nccl", dtype=torch.bfloat16, timeout=240)
    failures = _failures(results)
    assert not failures, failures


# ---------------------------------------------------------------- one process: size one


def _qkv(b: int = 2, n: int = 12, h: int = 4, d: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    return [torch.randn(b, n, h, d, generator=gen) for _ in range(3)]


def test_without_torch_distributed_it_is_local_attention_bitwise_and_runs_no_collective() -> None:
    q, k, v = _qkv()
    cos, sin = torch.randn(12, 8).cos(), torch.randn(12, 8).sin()
    layer = DistributedAttention(4, 16, causal=True)
    with count_collectives() as counts:
        out, rep = layer(q, k, v, freqs_cis=(cos, sin))
    assert sum(counts.values()) == 0, counts
    assert rep is None
    assert torch.equal(out, LocalAttention(4, 16, causal=True)(q, k, v, freqs_cis=(cos, sin)))
    assert get_sequence_parallel().size == 1


def test_size_one_with_replicated_tokens_and_padding_matches_the_joint_sequence() -> None:
    q, k, v = _qkv()
    rq, rk, rv = _qkv(n=3)
    layer = DistributedAttention(4, 16)
    out, rep = layer(q, k, v, original_seq_len=10, replicated_q=rq, replicated_k=rk,
                     replicated_v=rv)
    ref = LocalAttention(4, 16)(*(torch.cat([t[:, :10], r], 1) for t, r in
                                  zip((q, k, v), (rq, rk, rv), strict=True)))
    torch.testing.assert_close(out[:, :10], ref[:, :10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rep, ref[:, 10:], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(out[:, 10:]) == 0  # padding rows come back as zeros


@pytest.mark.parametrize(("heads", "kv_heads", "size", "expected"), [
    (24, 24, 2, (12, 12, 1)),
    (40, 8, 4, (10, 2, 1)),
    (8, 2, 4, (2, 1, 2)),  # fewer kv heads than ranks: each kv head serves 2 ranks
    (8, 1, 8, (1, 1, 8)),
])
def test_shard_heads_keeps_the_gqa_ratio(heads: int, kv_heads: int, size: int,
                                         expected: tuple[int, int, int]) -> None:
    assert shard_heads(heads, kv_heads, size) == expected


@pytest.mark.parametrize(("heads", "kv_heads", "size", "match"), [
    (6, 6, 4, "num_heads=6 is not divisible by the sequence-parallel size 4"),
    (12, 3, 2, "num_kv_heads=3 cannot be split over the sequence-parallel size 2"),
    (24, 6, 4, "num_kv_heads=6 cannot be split"),
])
def test_shard_heads_refuses_with_the_values(heads: int, kv_heads: int, size: int,
                                             match: str) -> None:
    with pytest.raises(ShardError, match=match):
        shard_heads(heads, kv_heads, size)


class TestInitSequenceParallel:
    def test_size_two_without_torch_distributed_is_refused(self) -> None:
        with pytest.raises(SequenceParallelError, match=r"size=2.*dist.init_process_group"):
            init_sequence_parallel(size=2)

    def test_bad_all_to_all_mode_is_refused(self) -> None:
        with pytest.raises(ValueError, match="all_to_all='ring' is not allowed"):
            init_sequence_parallel(all_to_all="ring")

    def test_bad_overlap_chunks_is_refused(self) -> None:
        with pytest.raises(ValueError, match="overlap_chunks=0"):
            init_sequence_parallel(overlap_chunks=0)

    def test_bad_local_first_is_refused(self) -> None:
        with pytest.raises(ValueError, match="local_first='yes' is not allowed"):
            init_sequence_parallel(local_first="yes")  # type: ignore[arg-type]

    def test_bad_copy_engine_is_refused(self) -> None:
        with pytest.raises(ValueError, match="copy_engine=.yes. is not allowed"):
            init_sequence_parallel(copy_engine="yes")  # type: ignore[arg-type]

    def test_copy_engine_demanded_without_a_group_is_refused(self) -> None:
        with pytest.raises(SequenceParallelError, match="copy_engine=True needs a 2-rank NCCL"):
            init_sequence_parallel(copy_engine=True)
        assert init_sequence_parallel().peer_copies is None

    def test_set_brings_back_a_group_built_earlier(self) -> None:
        first = init_sequence_parallel(local_first=True)
        second = init_sequence_parallel(local_first=False)
        assert get_sequence_parallel() is second
        assert set_sequence_parallel(first) is first
        assert get_sequence_parallel().local_first is True
        with pytest.raises(TypeError, match="sp=int is not allowed"):
            set_sequence_parallel(3)  # type: ignore[arg-type]

    def test_clear_forgets_the_group(self) -> None:
        sp = init_sequence_parallel(overlap_chunks=3)
        assert get_sequence_parallel() is sp
        assert sp.overlap_chunks == 3
        clear_sequence_parallel()
        assert get_sequence_parallel().overlap_chunks is None


@pytest.mark.parametrize(("backend", "tokens", "wanted", "expected"), [
    ("nccl", 32760, None, 1),  # measured on 2x H100: overlap lost, so none by default
    ("nccl", 32760, 4, 4),  # asked for: 4 chunks of 5 of the 20 heads per rank
    ("nccl", 1024, None, 1),  # short sequences: latency-bound, no chunking
    ("gloo", 32760, None, 1),  # CPU: the exchange competes with the compute for cores
    ("nccl", 32760, 3, 2),  # at most 3 chunks that divide 20 heads: 2
])
def test_overlap_chunks_divide_the_heads(backend: str, tokens: int, wanted: int | None,
                                         expected: int) -> None:
    layer = DistributedAttention(40, 128, num_kv_heads=40)
    sp = SequenceParallel(group=None, size=2, rank=0, backend=backend, overlap_chunks=wanted)
    assert layer._chunks(sp, tokens, 3) == expected
