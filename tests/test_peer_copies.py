"""PeerCopies' bookkeeping on CPU: regions, slots, growth and the agreed setup.

The copy engines themselves need two GPUs (tests/dist_worker.py: check_copy_engine_exchange runs
on NCCL); here both ranks live in one process and "map" each other's buffers through a stand-in
for the symmetric-memory handle, so what lands where can be checked exactly.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from attnrt.parallel.local_first import exchange_two_on_copy_engines, send_back
from attnrt.parallel.peer_copies import PeerCopies, _rows_of, copy_rows


class _World:
    """Both ranks' buffers, as a symmetric-memory rendezvous would map them to each rank."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}
        self.barriers = {0: 0, 1: 0}  # per rank: a real barrier pairs the i-th of each
        self.sync: threading.Barrier | None = None  # set where the ranks run in two threads


class _Handle:
    def __init__(self, world: _World, rank: int) -> None:
        self.world, self.rank = world, rank

    def get_buffer(self, rank: int, sizes: tuple[int, ...], dtype: torch.dtype,
                   storage_offset: int = 0) -> torch.Tensor:
        flat = self.world.buffers[rank].view(dtype)
        numel = math.prod(sizes)
        if storage_offset + numel > flat.numel():
            raise RuntimeError("region past the end of the buffer")
        return flat[storage_offset:storage_offset + numel].view(sizes)

    def barrier(self, channel: int = 0) -> None:
        self.world.barriers[self.rank] += 1
        if self.world.sync is not None:
            self.world.sync.wait(timeout=30)


class _Copies(PeerCopies):
    def __init__(self, world: _World, rank: int, agree: Any = bool) -> None:
        super().__init__(None, torch.device("cpu"), rank, agree)
        self.world = world
        self.attached = 0

    def _allocate(self, slot_bytes: int) -> torch.Tensor:
        return torch.full((2 * slot_bytes,), 0xFF, dtype=torch.uint8)  # NaN-ish poison

    def _attach(self, buffer: torch.Tensor, slot_bytes: int) -> None:
        self.world.buffers[self._rank] = buffer
        self._buffer, self._slot_bytes = buffer, slot_bytes
        self._handle = _Handle(self.world, self._rank)
        self.attached += 1


def _pair() -> tuple[_Copies, _Copies, _World]:
    world = _World()
    ranks = (_Copies(world, 0), _Copies(world, 1))
    for copies in ranks:
        copies._attach(copies._allocate(256), 256)
    return ranks[0], ranks[1], world


def _call(pair: tuple[_Copies, _Copies], sizes: dict[str, int], dtype: torch.dtype,
          seed: int) -> dict[tuple[int, str], torch.Tensor]:
    """One exchange call on both ranks: each sends seeded data of every kind to the other."""
    gen = torch.Generator().manual_seed(seed)
    sent = {}
    for copies in pair:
        copies.begin(sizes, dtype)
    for copies in pair:
        for kind, numel in sizes.items():
            sent[copies._rank, kind] = torch.randn(numel, generator=gen).to(dtype)
            copies.send(kind, sent[copies._rank, kind])
    return sent


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_send_lands_in_the_peers_inbox_of_that_kind(dtype: torch.dtype) -> None:
    a, b, world = _pair()
    sizes = {"fwd": 1000, "back": 37}
    sent = _call((a, b), sizes, dtype, seed=1)
    for me, peer in ((a, b), (b, a)):
        for kind in sizes:
            assert torch.equal(me.inbox(kind), sent[peer._rank, kind]), (me._rank, kind)
    assert world.barriers == {0: 2, 1: 2}  # one per send


def test_a_shorter_send_fills_the_start_of_the_region() -> None:
    a, b, _ = _pair()
    a.begin({"fwd": 64}, torch.float32)
    b.begin({"fwd": 64}, torch.float32)
    part = torch.arange(10, dtype=torch.float32)
    a.send("fwd", part.view(2, 5))
    assert torch.equal(b.inbox("fwd")[:10], part)


def test_regions_start_aligned_and_do_not_overlap() -> None:
    a, b, _ = _pair()
    a.begin({"x": 3, "y": 5, "z": 1}, torch.bfloat16)
    starts = sorted(offset for offset, _ in a._layout.values())
    assert all(offset % 256 == 0 for offset in starts)
    assert len(set(starts)) == 3


def test_calls_alternate_slots_so_the_last_inbox_survives_the_next_send() -> None:
    a, b, _ = _pair()
    sizes = {"fwd": 300, "back": 20}
    first = _call((a, b), sizes, torch.float32, seed=2)
    kept = b.inbox("fwd")  # a view still read (by attention) while the next call's data lands
    second = _call((a, b), sizes, torch.float32, seed=3)
    assert torch.equal(kept, first[0, "fwd"])
    assert torch.equal(b.inbox("fwd"), second[0, "fwd"])
    third = _call((a, b), sizes, torch.float32, seed=4)  # back on the first slot
    assert torch.equal(kept, third[0, "fwd"])


def test_a_larger_call_grows_the_buffer_and_still_delivers() -> None:
    a, b, _ = _pair()
    _call((a, b), {"fwd": 8}, torch.float32, seed=5)
    assert a.attached == 1
    sent = _call((a, b), {"fwd": 5000, "back": 700}, torch.bfloat16, seed=6)
    assert a.attached == 2
    assert a._slot_bytes >= 5000 * 2 + 768
    assert torch.equal(a.inbox("back"), sent[1, "back"])
    _call((a, b), {"fwd": 100}, torch.float32, seed=7)  # smaller again: no new rendezvous
    assert a.attached == 2


def _failing(world: _World, fail: str) -> type[PeerCopies]:
    """A PeerCopies class as build() constructs it, failing at `fail` ("allocate", "attach")."""

    class Failing(_Copies):
        def __init__(self, group: Any, device: torch.device, rank: int, agree: Any) -> None:
            super().__init__(world, rank, agree)

        def _allocate(self, slot_bytes: int) -> torch.Tensor:
            if fail == "allocate":
                raise RuntimeError("CUDA symmetric memory is not supported here")
            return super()._allocate(slot_bytes)

        def _attach(self, buffer: torch.Tensor, slot_bytes: int) -> None:
            if fail == "attach":
                raise RuntimeError("cannot map the peer's memory")
            super()._attach(buffer, slot_bytes)

    return Failing


@pytest.mark.parametrize(("fail", "peer_ok", "asked"), [
    ("allocate", True, [False]),          # no rendezvous when any rank could not allocate
    ("attach", True, [True, False]),      # a failed mapping disables the exchange everywhere
    ("none", False, [True]),              # the peer could not allocate: no rendezvous here
    ("none", True, [True, True]),
])
def test_setup_is_agreed_before_and_after_the_rendezvous(monkeypatch: pytest.MonkeyPatch,
                                                         fail: str, peer_ok: bool,
                                                         asked: list[bool]) -> None:
    import attnrt.parallel.peer_copies as mod

    monkeypatch.setattr(mod.dist, "get_rank", lambda group: 0)
    world = _World()
    answers: list[bool] = []

    def agree(ok: bool) -> bool:
        answers.append(ok)
        return ok and peer_ok

    built = _failing(world, fail).build(None, torch.device("cpu"), agree)
    assert answers == asked
    assert (built is not None) == (fail == "none" and peer_ok)
    assert (0 in world.buffers) == (fail == "none" and peer_ok)  # attached only when agreed


def test_sends_must_follow_begins_order_and_a_call_must_finish() -> None:
    a, b, _ = _pair()
    a.begin({"fwd": 4, "back": 4}, torch.float32)
    with pytest.raises(RuntimeError, match=r"send\('back'\) out of order"):
        a.send("back", torch.ones(4))
    a.send("fwd", torch.ones(4))
    with pytest.raises(RuntimeError, match=r"\['back'\] of the previous one were never sent"):
        a.begin({"fwd": 4, "back": 4}, torch.float32)


def test_abandon_keeps_the_barriers_paired_and_poisons_what_the_peer_misses() -> None:
    a, b, world = _pair()
    sizes = {"fwd": 50, "back": 30}
    for copies in (a, b):
        copies.begin(sizes, torch.float32)
    a.send("fwd", torch.ones(50))
    b.send("fwd", torch.ones(50))
    a.send("back", torch.full((30,), 2.0))
    b.abandon()  # an error on rank 1 between B and the return
    assert world.barriers[0] == world.barriers[1]
    assert torch.isnan(a.inbox("back")).all()  # not the stale data of an earlier call
    sent = _call((a, b), sizes, torch.float32, seed=8)  # the next call is in step again
    assert torch.equal(a.inbox("back"), sent[1, "back"])
    assert world.barriers[0] == world.barriers[1]


@pytest.mark.parametrize("fail_here", [True, False])  # this rank fails, or only the peer
def test_a_failed_growth_raises_on_every_rank_and_leaves_the_buffer_usable(
        fail_here: bool) -> None:
    from attnrt.parallel.groups import SequenceParallelError

    asked: list[bool] = []

    def agree(ok: bool) -> bool:
        asked.append(ok)
        return ok and fail_here  # the peer's answer: fine exactly when this rank fails

    class Small(_Copies):
        def _allocate(self, slot_bytes: int) -> torch.Tensor:
            if fail_here and slot_bytes > 256:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super()._allocate(slot_bytes)

    copies = Small(_World(), 0, agree)
    copies._attach(copies._allocate(256), 256)
    with pytest.raises(SequenceParallelError, match="could not grow.*copy_engine=False"):
        copies.begin({"fwd": 10_000}, torch.float32)
    assert asked == ([False] if fail_here else [True])
    assert copies._slot_bytes == 256
    copies.begin({"fwd": 8}, torch.float32)  # what still fits works as before
    assert copies.inbox("fwd").numel() == 8


# ------------------------------------------------------------------ copy_rows and local-first


def test_copy_rows_copies_strided_rows_and_names_a_mismatch() -> None:
    src = torch.randn(6, 4, 10)[:, 1:3].flatten(1)  # rows of 20 contiguous values, pitch 40
    dst = torch.full((6, 2, 30), float("nan"))[:, 1, 5:25]
    copy_rows(dst, src)  # on CPU: dst.copy_, the same values the 2D memcpy writes on CUDA
    assert torch.equal(dst, src)
    with pytest.raises(ValueError, match=r"dst \(6, 20\).*src \(6, 19\)"):
        copy_rows(dst, src[:, :19])


def test_the_2d_copy_struct_matches_cuda_memcpy2d() -> None:
    import ctypes

    from attnrt.parallel.peer_copies import _Memcpy2D

    # cuda.h, CUDA_MEMCPY2D_v2 on 64-bit hosts: 16 fields, an enum padded to 8 bytes twice.
    offsets = {"srcXInBytes": 0, "srcY": 8, "srcMemoryType": 16, "srcHost": 24,
               "srcDevice": 32, "srcArray": 40, "srcPitch": 48, "dstXInBytes": 56, "dstY": 64,
               "dstMemoryType": 72, "dstHost": 80, "dstDevice": 88, "dstArray": 96,
               "dstPitch": 104, "WidthInBytes": 112, "Height": 120}
    assert {name: getattr(_Memcpy2D, name).offset for name in offsets} == offsets
    assert ctypes.sizeof(_Memcpy2D) == 128


def test_rows_of_takes_only_matrices_with_contiguous_rows() -> None:
    base = torch.zeros(8, 16, dtype=torch.bfloat16)
    assert _rows_of(base[:, 4:12]) == (32, 16)  # pitch and width in bytes
    assert _rows_of(base[:1, 4:12]) == (16, 16)  # one row: its pitch is its width
    assert _rows_of(base[:, ::2]) is None  # strided inside a row
    assert _rows_of(base.t()) is None
    assert _rows_of(base.view(8, 4, 4)) is None  # not a matrix
    assert _rows_of(base.as_strided((4, 8), (4, 1))) is None  # rows would overlap


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_local_first_on_copy_engines_lands_every_part(kv_heads: int) -> None:
    """Both ranks in two threads, barriers real: the peer's heads of q, k and v land in this
    rank's inbox, own k/v rows after them, and what B returns lands in the peer's heads of
    the output (only there)."""
    s, h, d = 5, 4, 3
    world = _World()
    world.sync = threading.Barrier(2)
    ranks = (_Copies(world, 0), _Copies(world, 1))
    for copies in ranks:
        copies._attach(copies._allocate(4096), 4096)
    gen = torch.Generator().manual_seed(5)
    inputs = [[torch.randn(1, s, heads, d, generator=gen) for heads in (h, kv_heads, kv_heads)]
              for _ in ranks]

    def rank_main(rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        rank_heads = [t.unflatten(2, (2, -1)) for t in inputs[rank]]
        own = [t[:, :, rank] for t in rank_heads]
        q_in, k_all, v_all, theirs, fill_own, works = exchange_two_on_copy_engines(
            rank_heads, own, [1 - rank], ranks[rank])
        fill_own()
        for work in works:
            work.wait()
        got = [q_in.clone(), k_all.clone(), v_all.clone(), k_all[:, theirs].clone()]
        out = torch.full((1, s, h, d), float("nan"))
        target = out[0].unflatten(1, (2, -1))[:, 1 - rank].flatten(1)
        send_back(q_in * 2 + 1, None, ranks[rank], [target]).wait()  # B: a stand-in
        return got, out

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(rank_main, (0, 1)))
    for rank, ((q_in, k_all, v_all, k_theirs), out) in enumerate(results):
        peer = 1 - rank
        q_p, k_p, v_p = (t.unflatten(2, (2, -1))[:, :, rank] for t in inputs[peer])
        q_o, k_o, v_o = (t.unflatten(2, (2, -1))[:, :, rank] for t in inputs[rank])
        assert torch.equal(q_in, q_p)
        assert torch.equal(k_all, torch.cat([k_p, k_o], dim=1))
        assert torch.equal(v_all, torch.cat([v_p, v_o], dim=1))
        assert torch.equal(k_theirs, k_p)
        heads = out.unflatten(2, (2, -1))
        mine_sent = inputs[rank][0].unflatten(2, (2, -1))[:, :, peer]
        assert torch.equal(heads[:, :, peer], mine_sent * 2 + 1)  # the peer's B of my queries
        assert heads[:, :, rank].isnan().all()  # A and C write there, not the exchange
    assert world.barriers == {0: 2, 1: 2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_copy_rows_on_cuda_is_one_2d_memcpy(monkeypatch: pytest.MonkeyPatch,
                                           dtype: torch.dtype) -> None:
    import attnrt.parallel.peer_copies as pc

    calls: list[int] = []
    real = pc._memcpy_2d_async()
    assert real is not None, "the driver's cuMemcpy2DAsync did not load"

    def spy(spec: Any, stream: Any) -> int:
        calls.append(1)
        return real(spec, stream)

    monkeypatch.setattr(pc, "_memcpy_2d_async", lambda: spy)
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(3001, 24, 128, device="cuda", dtype=dtype, generator=gen)  # [S, H, D]
    out = torch.full((3001, 40, 128), float("nan"), device="cuda", dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # on the stream that is current, like the exchange's
        copy_rows(out[:, 7:19].flatten(1), x[:, 12:].flatten(1))
    torch.cuda.current_stream().wait_stream(side)
    assert calls == [1]
    assert torch.equal(out[:, 7:19], x[:, 12:])
    assert out[:, :7].isnan().all()
    assert out[:, 19:].isnan().all()
