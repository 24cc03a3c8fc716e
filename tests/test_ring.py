"""Ring attention and USP (Ulysses x ring) on gloo: 4 ranks (1x4, 2x2, 4x1) and 8 ranks (2x4).

The multi-process checks live in tests/ring_worker.py; each world is spawned once and runs
its checks there. The rest runs in this process: the layouts, the piece plans (zigzag keeps
every rank's work equal) and the ring's schedule with threads standing in for ranks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

import attnrt
from attnrt.parallel.groups import (
    SequenceParallelError,
    clear_sequence_parallel,
    init_sequence_parallel,
)
from attnrt.parallel.mesh import resolve_shape
from attnrt.parallel.plan import plan_sp
from attnrt.parallel.ring import plan_pieces, ring_spec
from attnrt.parallel.usp import pad_heads
from attnrt.parallel.zigzag import (
    LayoutError,
    shard_positions,
    shard_sequence,
    unshard_sequence,
    zigzag_shard,
    zigzag_unshard,
)
from attnrt.tools import cli
from tests.ring_streams import ring_on_threads
from tests.ring_worker import CHECKS, run_ring_world


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    attnrt.clear_caches()
    clear_sequence_parallel()
    yield
    clear_sequence_parallel()
    attnrt.clear_caches()


def _failures(results: dict[str, dict[int, str]]) -> str:
    return "\n".join(f"--- {name} on rank {rank}:\n{verdict}"
                     for name, by_rank in results.items()
                     for rank, verdict in by_rank.items() if verdict != "ok")


WORLD_8 = ["plain_and_causal", "gqa_padding_replicated",
           "backends_are_chosen_at_the_piece_lengths_they_run"]


NCCL_CHECKS = ["plain_and_causal", "gqa_padding_replicated", "a_whole_shard_of_padding",
               "heads_not_dividing_ulysses_are_padded", "vsa_matches_one_device",
               "refusals_raise_on_every_rank"]


@pytest.mark.distributed
@pytest.mark.parametrize(("world", "names", "dtype"), [
    (4, sorted(CHECKS), torch.float32), (8, WORLD_8, torch.float32),
    (2, NCCL_CHECKS, torch.bfloat16)])
def test_every_ring_check_passes_on_every_gloo_rank(world: int, names: list[str],
                                                    dtype: torch.dtype) -> None:
    """Outputs and gradients of DistributedAttention on U x R meshes (and of ring_attention
    over a group) equal single-process attention (fp32, relative L2 < 1e-5; the bf16 world,
    which runs the NCCL test's checks, < 1.5e-2): plain, causal, contiguous and zigzag
    layouts, GQA, replicated tokens, padding, rotary, heads padded for U, VSA under Ulysses;
    K/V memory per rank falls as 1/R; every refusal raises on every rank."""
    results = run_ring_world(world, names, timeout=100.0, dtype=dtype)
    failures = _failures(results)
    assert not failures, failures


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ring_and_usp_on_every_gpu_with_nccl(dtype: torch.dtype) -> None:
    """One rank a GPU over NCCL, on every GPU of the machine (2, 4 or 8): DistributedAttention
    on each U x R mesh with U <= 4 (the ring path wherever R > 1, its piece backward through
    TRITON_FLASH_ATTN's kernels at head size 64) and DistributedAttention_VSA under Ulysses,
    outputs and gradients against one GPU's fp32 LocalAttention on the whole sequence
    (relative L2 < 1e-5 in fp32, 1.5e-2 in bf16); refusals raise on every rank."""
    gpus = min(torch.cuda.device_count(), 8)
    if gpus < 2:
        pytest.skip(f"needs 2 or more CUDA GPUs; found {gpus}")
    world = gpus if gpus in (2, 4, 8) else 2
    results = run_ring_world(world, NCCL_CHECKS, timeout=400.0, backend="nccl", dtype=dtype)
    failures = _failures(results)
    assert not failures, failures


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize(("ring", "ulysses", "layout"), [
    (2, 1, "zigzag"), (4, 1, "zigzag"), (2, 2, "zigzag"), (4, 2, "contiguous"),
    (2, 2, "contiguous")])
def test_shard_then_unshard_gives_the_sequence_back(ring: int, ulysses: int, layout: str) -> None:
    x = torch.randn(2, 13, 3, 4)
    shards = [shard_sequence(x, g, ring=ring, ulysses=ulysses, layout=layout)
              for g in range(ring * ulysses)]
    assert len({s.shape for s in shards}) == 1
    back = unshard_sequence(shards, ring=ring, ulysses=ulysses, layout=layout, length=13)
    assert torch.equal(back, x)


def test_zigzag_gives_ring_rank_r_chunks_r_and_2r_minus_1_minus_r() -> None:
    # R = 2, U = 2, N = 16: chunks of 4; ring rank 0 holds chunks 0 and 3, rank 1 chunks 1, 2.
    assert shard_positions(0, 4, ring=2, ulysses=2, layout="zigzag").tolist() == [0, 1, 2, 3]
    assert shard_positions(1, 4, ring=2, ulysses=2, layout="zigzag").tolist() == [12, 13, 14, 15]
    assert shard_positions(2, 4, ring=2, ulysses=2, layout="zigzag").tolist() == [4, 5, 6, 7]
    assert shard_positions(3, 4, ring=2, ulysses=2, layout="zigzag").tolist() == [8, 9, 10, 11]
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert zigzag_shard(x, 1, ring=2).flatten().tolist() == [2, 3, 4, 5]
    assert torch.equal(zigzag_unshard([zigzag_shard(x, r, ring=2) for r in range(2)], ring=2), x)


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(LayoutError, match="layout='striped' is not allowed"):
        shard_sequence(torch.zeros(1, 4, 1, 1), 0, ring=2, layout="striped")
    with pytest.raises(LayoutError, match="rank=4 is not allowed"):
        shard_sequence(torch.zeros(1, 4, 1, 1), 4, ring=2, ulysses=2)
    with pytest.raises(LayoutError, match="even number of tokens per ring rank; got 3"):
        shard_positions(0, 3, ring=2, layout="zigzag")


def _work(ring: int, layout: str, rank: int, block: int) -> list[int]:
    """Score elements each ring step costs ring rank `rank` (causal; a diagonal counts half)."""
    spec = ring_spec(_FakeRing(ring, rank, layout), block, True, 1.0, None, None)  # type: ignore[arg-type]
    steps = []
    for step in range(ring):
        src = (rank - step) % ring
        pieces = plan_pieces(spec.q_runs, spec.k_runs[src], True)
        steps.append(sum((p.q.stop - p.q.start) * (p.k.stop - p.k.start) // (2 if p.causal else 1)
                         for p in pieces))
    return steps


class _FakeRing:
    def __init__(self, size: int, rank: int, layout: str) -> None:
        self.size, self.rank, self.layout = size, rank, layout


@pytest.mark.parametrize("ring", [2, 4, 8])
def test_zigzag_gives_every_ring_rank_the_same_causal_work(ring: int) -> None:
    zigzag = [sum(_work(ring, "zigzag", r, 64)) for r in range(ring)]
    contiguous = [sum(_work(ring, "contiguous", r, 64)) for r in range(ring)]
    assert len(set(zigzag)) == 1, zigzag
    assert contiguous[-1] == (2 * ring - 1) * contiguous[0], contiguous  # the idling it avoids
    assert sum(zigzag) == sum(contiguous)


def test_own_zigzag_block_is_one_causal_call_and_others_half_a_block() -> None:
    spec = ring_spec(_FakeRing(4, 1, "zigzag"), 8, True, 1.0, None, None)  # type: ignore[arg-type]
    own = plan_pieces(spec.q_runs, spec.k_runs[1], True)
    assert [(p.q, p.k, p.causal) for p in own] == [(slice(0, 8), slice(0, 8), True)]
    earlier = plan_pieces(spec.q_runs, spec.k_runs[0], True)  # all queries, first half keys
    assert [(p.q, p.k, p.causal) for p in earlier] == [(slice(0, 8), slice(0, 4), False)]
    later = plan_pieces(spec.q_runs, spec.k_runs[3], True)  # second half queries, all keys
    assert [(p.q, p.k, p.causal) for p in later] == [(slice(4, 8), slice(0, 8), False)]


@pytest.mark.parametrize(("heads", "kv_heads", "ulysses", "expected"), [
    (6, 6, 4, (8, 8)), (8, 2, 4, (8, 2)), (6, 3, 2, (8, 4)), (3, 1, 2, (6, 2)), (40, 8, 8, (40, 8)),
    (12, 3, 2, (16, 4))])
def test_pad_heads_adds_the_fewest_zero_heads(heads: int, kv_heads: int, ulysses: int,
                                              expected: tuple[int, int]) -> None:
    assert pad_heads(heads, kv_heads, ulysses) == expected


# ---------------------------------------------------------------- threads as ranks (CPU)


@pytest.mark.parametrize(("size", "layout", "causal"), [
    (1, "contiguous", True), (2, "zigzag", True), (3, "contiguous", False), (4, "zigzag", True)])
def test_ring_on_threads_matches_dense_attention(size: int, layout: str, causal: bool) -> None:
    errs = ring_on_threads(size, layout, causal, "cpu", torch.float32)
    assert max(errs) < 1e-5, errs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_merge_and_overlap_on_cuda_streams(dtype: torch.dtype) -> None:
    """Four CUDA streams (one per virtual rank, plus one copy stream each) run the ring on one
    GPU: K/V copies posted before each block's attention, merges in fp32, exact results."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    errs = ring_on_threads(4, "zigzag", True, "cuda", dtype)
    assert max(errs) < (1e-5 if dtype == torch.float32 else 1.5e-2), errs


# ---------------------------------------------------------------- the planner


def test_plan_keeps_ulysses_inside_a_node_and_rings_across_nodes() -> None:
    plan = plan_sp(16, num_heads=40, seq_len=75600, gpus_per_node=8)
    assert (plan.ulysses, plan.ring) == (8, 2)
    assert "not allowed: U=16" in plan.reason
    assert len(plan.times) == 5


def test_plan_moves_what_the_heads_cannot_split_into_the_ring() -> None:
    plan = plan_sp(8, num_heads=6, seq_len=32760, gpus_per_node=8)
    assert (plan.ulysses, plan.ring) == (2, 4)  # 6 heads: U in (1, 2) splits them unpadded
    assert "not allowed: U=4, U=8" in plan.reason
    gqa = plan_sp(8, num_heads=32, num_kv_heads=8, seq_len=131072, causal=True,
                  gpus_per_node=8)
    assert gqa.ulysses * gqa.ring == 8
    assert 32 % gqa.ulysses == 0


def test_plan_without_heads_fills_a_node_with_ulysses() -> None:
    assert (plan_sp(16, gpus_per_node=8).ulysses, plan_sp(16, gpus_per_node=8).ring) == (8, 2)
    with pytest.raises(SequenceParallelError, match="world=0 is not allowed"):
        plan_sp(0)


def test_plan_sp_command_prints_the_shape_and_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan-sp", "--world", "16", "--heads", "40", "--seq-len", "75600",
                     "--gpus-per-node", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["ulysses"], data["ring"]) == (8, 2)
    assert cli.main(["plan-sp", "--world", "8", "--heads", "6", "--gpus-per-node", "8"]) == 0
    assert capsys.readouterr().out.startswith("ulysses=2 ring=4\n")


def test_usp_arguments_are_checked_before_any_group_is_built() -> None:
    with pytest.raises(SequenceParallelError, match="needs torch.distributed"):
        init_sequence_parallel(ulysses=2, ring=2)
    with pytest.raises(SequenceParallelError, match="group=/size= and ulysses="):
        init_sequence_parallel(size=2, ring=2)
    with pytest.raises(TypeError, match="allowed only with plan="):
        init_sequence_parallel(num_heads=4)
    with pytest.raises(SequenceParallelError, match=r"ulysses=3 x ring=2 = 6 is not the world"):
        resolve_shape(3, 2, None, 4, {})
    assert resolve_shape(None, 2, None, 8, {})[:2] == (4, 2)
    assert resolve_shape(None, None, None, 8, {})[:2] == (8, 1)


def test_piece_gradients_in_row_chunks_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward bounds its score memory by working in row chunks (causal offsets kept)."""
    from attnrt.parallel import ring_math

    monkeypatch.setattr(ring_math, "CHUNK_ELEMENTS", 64)  # a few rows per chunk
    errs = ring_on_threads(2, "zigzag", True, "cpu", torch.float32)
    assert max(errs) < 1e-5, errs
