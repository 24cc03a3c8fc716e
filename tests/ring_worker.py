"""Spawned-worker side of the ring / USP tests: one gloo world, every check in it.

`run_ring_world(world, names)` starts `world` processes, each runs the named checks in order,
and returns {check: {rank: "ok" | traceback}}; every wait has a timeout. A check builds the
full sequence from one seed on every rank, shards it as the layout says
(attnrt.parallel.zigzag.shard_sequence) and compares with single-process attention on the
whole sequence: outputs and gradients, fp32, relative L2 < 1e-5.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import attnrt
from attnrt.backends.sdpa import sdpa_bnhd
from attnrt.interfaces import AttentionBackend, AttentionImpl
from attnrt.layers import LocalAttention, apply_rotary_emb
from attnrt.parallel import groups as sp_mod
from attnrt.parallel.groups import (
    SequenceParallelError,
    ShardError,
    ShardMismatchError,
    clear_sequence_parallel,
    init_sequence_parallel,
    set_sequence_parallel,
)
from attnrt.parallel.layers import DistributedAttention, DistributedAttention_VSA
from attnrt.parallel.ring import KV_MEMORY, Ring, ring_attention
from attnrt.parallel.zigzag import LayoutError, shard_sequence
from tests.dist_worker import GatedImpl, count_collectives, free_port, register_test_backends
from tests.helpers import dense_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
# How this world runs: gloo on CPU in fp32 (head size 8), or NCCL with one GPU a rank, the
# distributed layers in RUN["dtype"] against one GPU's fp32 LocalAttention (head size 64, so
# TRITON_FLASH_ATTN's kernels serve the ring's piece backward). Set by _worker.
RUN: dict[str, Any] = {"device": torch.device("cpu"), "dtype": torch.float32, "head_size": 8,
                       "backend": "gloo"}


class NoLseImpl(AttentionImpl):
    """Plain SDPA, no forward_with_lse and no hooks: ring attention must refuse it."""

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "", **extra: Any) -> None:
        self.causal, self.scale = causal, softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        return sdpa_bnhd(query, key, value, self.causal, self.scale)


class NoLseBackend(AttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "NO_LSE_TEST"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return NoLseImpl


class HookedLseImpl(NoLseImpl):
    """Returns lse, but reorders tokens in hooks: ring attention must refuse it."""

    def preprocess_qkv(self, qkv: torch.Tensor, attn_metadata: Any) -> torch.Tensor:
        return qkv.flip(1)

    def forward_with_lse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from attnrt.backends.sdpa import sdpa_with_lse

        return sdpa_with_lse(query, key, value, self.causal, self.scale)


class HookedLseBackend(NoLseBackend):
    @staticmethod
    def get_name() -> str:
        return "HOOKED_LSE_TEST"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return HookedLseImpl


class SparseLseImpl(NoLseImpl):
    """Returns lse, no hooks, but implements a sparse method: ring attention must refuse it."""

    def forward_with_lse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from attnrt.backends.sdpa import sdpa_with_lse

        return sdpa_with_lse(query, key, value, self.causal, self.scale)


class SparseLseBackend(NoLseBackend):
    METHODS = frozenset({"vsa"})

    @staticmethod
    def get_name() -> str:
        return "SPARSE_LSE_TEST"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return SparseLseImpl


def rel(got: torch.Tensor, want: torch.Tensor, what: str, rank: int) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    tol = TOL[RUN["dtype"]]  # the layers' dtype, whatever dtype a result is summed in
    got64, want64 = got.detach().double(), want.detach().double()
    assert torch.isfinite(got64).all(), f"{what}: not finite on rank {rank}"
    err = ((got64 - want64).norm() / want64.norm().clamp_min(1e-30)).item()
    assert err < tol, f"{what}: relative L2 error {err:.3g} >= {tol} on rank {rank}"


def randn(*shape: int, seed: int) -> torch.Tensor:
    """The same fp32 tensor on every rank, on this world's device."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return t.to(RUN["device"])


def low(t: torch.Tensor) -> torch.Tensor:
    """An input of the distributed layer: in this world's dtype, a leaf."""
    return t.detach().to(RUN["dtype"]).requires_grad_(True)


# ---------------------------------------------------------------- mesh configurations

_MESHES: dict[tuple[int, int, str], Any] = {}


def use_mesh(ulysses: int, ring: int, layout: str = "contiguous") -> Any:
    """Set the U x R SP group (built once per world and shape; layouts share the mesh)."""
    key = (ulysses, ring, "contiguous")
    if key not in _MESHES:
        _MESHES[key] = init_sequence_parallel(ulysses=ulysses, ring=ring)
    sp = _MESHES[key]
    if layout != "contiguous" and sp.usp is not None:
        usp = replace(sp.usp, ring=replace(sp.usp.ring, layout=layout))
        sp = replace(sp, usp=usp)
    return set_sequence_parallel(sp)


def shapes(world: int) -> list[tuple[int, int]]:
    """The U x R meshes a check runs on: on gloo a few (CI time), on NCCL every one with U <= 4
    (the checks' 4 heads split over U)."""
    if RUN["backend"] == "nccl":
        return [(u, world // u) for u in (1, 2, 4) if world % u == 0]
    return {4: [(1, 4), (2, 2), (4, 1)], 8: [(2, 4)], 2: [(1, 2)]}[world]


# ---------------------------------------------------------------- layer comparisons


def compare_layer(rank: int, world: int, u: int, r: int, layout: str, *, h: int = 4,
                  hkv: int | None = None, n: int = 16, causal: bool = False, rep: int = 0,
                  padded_to: int | None = None, rotary: bool = False) -> None:
    """DistributedAttention on the U x R mesh vs LocalAttention on the whole sequence (one
    device, fp32)."""
    b, d, hkv = 2, RUN["head_size"], hkv or h
    full = [randn(b, n, x, d, seed=s) for x, s in ((h, 1), (hkv, 2), (hkv, 3))]
    reps = [randn(b, rep, x, d, seed=s) for x, s in ((h, 11), (hkv, 12), (hkv, 13))] if rep else []
    ref_in = [t.clone().requires_grad_(True) for t in full + reps]
    freqs = None
    if rotary:
        angles = randn(n, d // 2, seed=99) * 3
        freqs = (angles.cos(), angles.sin())
    rq, rk, rv = ref_in[:3]
    if freqs is not None:
        rq, rk = apply_rotary_emb(rq, *freqs), apply_rotary_emb(rk, *freqs)
    joint = [torch.cat([t, x], 1) for t, x in zip((rq, rk, rv), ref_in[3:], strict=True)] \
        if rep else [rq, rk, rv]
    ref = LocalAttention(h, d, hkv, causal=causal)(*joint)

    def shard(t: torch.Tensor) -> torch.Tensor:
        if padded_to:
            t = F.pad(t, (0, 0, 0, 0, 0, padded_to - t.shape[1]))
        return shard_sequence(t, rank, ring=r, ulysses=u, layout=layout)

    dist_in = [low(shard(t)) for t in full]
    dist_reps = [low(t) for t in reps]
    layer = DistributedAttention(h, d, hkv, causal=causal)
    s = dist_in[0].shape[1]
    out, rep_out = layer(*dist_in, original_seq_len=n if s * world != n else None,
                         replicated_q=dist_reps[0] if rep else None,
                         replicated_k=dist_reps[1] if rep else None,
                         replicated_v=dist_reps[2] if rep else None, freqs_cis=freqs)
    what = f"U{u}xR{r} {layout} causal={causal} h={h}/{hkv} n={n} rep={rep}"
    rel(out, shard(ref[:, :n].detach()), f"{what}: output", rank)
    if rep:
        rel(rep_out, ref[:, n:].detach(), f"{what}: replicated output", rank)
    g = randn(*ref.shape, seed=7)
    (ref * g).sum().backward()
    loss = (out * shard(g[:, :n])).sum() + ((rep_out * g[:, n:]).sum() if rep else 0)
    loss.backward()
    for i, name in enumerate("qkv"):
        rel(dist_in[i].grad, shard(ref_in[i].grad), f"{what}: d{name}", rank)
    for i, name in enumerate("qkv"[:len(reps)]):
        grad = dist_reps[i].grad.float()  # each rank's share; the whole mesh sums (in fp32)
        dist.all_reduce(grad)
        rel(grad, ref_in[3 + i].grad, f"{what}: d replicated_{name}", rank)


def _each_shape(world: int, fn: Callable[[int, int, str], None],
                layouts: tuple[str, ...] = ("contiguous", "zigzag")) -> None:
    for u, r in shapes(world):
        for layout in layouts:
            use_mesh(u, r, layout)
            fn(u, r, layout)


def check_plain_and_causal(rank: int, world: int) -> None:
    """Contiguous non-causal, zigzag causal (the other pairings: the next check)."""
    def run(u: int, r: int, layout: str) -> None:
        compare_layer(rank, world, u, r, layout, causal=layout == "zigzag")
    _each_shape(world, run)


def check_gqa_padding_replicated(rank: int, world: int) -> None:
    """GQA 8:2, 13 real tokens of 16, 3 replicated, rotary: contiguous causal, zigzag not."""
    def run(u: int, r: int, layout: str) -> None:
        compare_layer(rank, world, u, r, layout, h=8, hkv=2, n=13, causal=layout != "zigzag",
                      rep=3, rotary=True)
    _each_shape(world, run)


def check_a_whole_shard_of_padding(rank: int, world: int) -> None:
    def run(u: int, r: int, layout: str) -> None:
        compare_layer(rank, world, u, r, layout, n=11, padded_to=16 + 2 * world, causal=True)
    _each_shape(world, run)


def check_heads_not_dividing_ulysses_are_padded(rank: int, world: int) -> None:
    def run(u: int, r: int, layout: str) -> None:
        if r == 1:
            return  # plain Ulysses refuses them, as before (test_distributed)
        compare_layer(rank, world, u, r, layout, h=3, hkv=3 if u > 1 else 1, causal=True)
        compare_layer(rank, world, u, r, layout, h=6, hkv=3, rep=2)
    _each_shape(world, run, ("zigzag",))


def check_collectives_of_one_forward(rank: int, world: int) -> None:
    """One shape check; R - 1 K/V rotations; U > 1 adds Ulysses' 3 + 1 all-to-alls."""
    for u, r in shapes(world):
        if r == 1:
            continue
        use_mesh(u, r)
        layer = DistributedAttention(4, 8)
        q, k, v = (randn(1, 4, 4, 8, seed=s) for s in (1, 2, 3))
        with torch.no_grad(), count_collectives() as counts:
            layer(q, k, v)
        gathers = counts["all_gather_single"] + counts["all_gather_into_tensor"]
        assert gathers == 1, counts
        assert counts["batch_isend_irecv"] == r - 1, counts
        assert counts["all_to_all_single"] == (4 if u > 1 else 0), counts


# ---------------------------------------------------------------- ring core over a group


def check_ring_core_against_dense(rank: int, world: int) -> None:
    """ring_attention over the world (R = world) and over pairs (R = 2), fp32."""
    pairs, _ = dist.new_subgroups(group_size=2)
    for group, size, sub_rank in ((None, world, rank), (pairs, 2, rank % 2)):
        for layout in ("contiguous", "zigzag"):
            for causal, n, t, h, hkv in ((False, 16, 0, 4, 4), (True, 16, 0, 4, 2),
                                         (True, 13, 3, 4, 1), (False, 11, 2, 2, 2)):
                ring = Ring.over(group, layout)
                _core_case(ring, size, sub_rank, causal, n, t, h, hkv)


def _core_case(ring: Ring, size: int, rank: int, causal: bool, n: int, t: int, h: int,
               hkv: int) -> None:
    b, d = 2, 8
    full = [randn(b, n, x, d, seed=s) for x, s in ((h, 21), (hkv, 22), (hkv, 23))]
    reps = [randn(b, t, x, d, seed=s) for x, s in ((h, 24), (hkv, 25), (hkv, 26))]
    ref_in = [x.clone().requires_grad_(True) for x in full + reps]
    ref = dense_reference(*(torch.cat([a, c], 1) for a, c in zip(ref_in[:3], ref_in[3:],
                                                                  strict=True)), causal)
    shard = (lambda x: shard_sequence(x, rank, ring=size, layout=ring.layout))  # noqa: E731
    mine = [shard(x).requires_grad_(True) for x in full]
    rep_in = [x.clone().requires_grad_(True) for x in reps]
    got = ring_attention(*mine, ring, causal=causal, original_seq_len=n,
                         replicated=tuple(rep_in) if t else None)  # type: ignore[arg-type]
    out, rep_out = got if t else (got, None)
    what = f"core R{size} {ring.layout} causal={causal} n={n} t={t} h={h}/{hkv}"
    rel(out, shard(ref[:, :n].detach()).float(), f"{what}: output", rank)
    g = randn(*ref.shape, seed=8).double()
    (ref * g).sum().backward()
    loss = (out * shard(g[:, :n]).float()).sum()
    if t:
        rel(rep_out, ref[:, n:].detach().float(), f"{what}: replicated output", rank)
        loss = loss + (rep_out * g[:, n:].float()).sum()
    loss.backward()
    for i, name in enumerate("qkv"):
        rel(mine[i].grad, shard(ref_in[i].grad).float(), f"{what}: d{name}", rank)
    for i, name in enumerate("qkv" if t else ""):
        grad = rep_in[i].grad.clone()
        dist.all_reduce(grad, group=ring.group)
        rel(grad, ref_in[3 + i].grad.float(), f"{what}: d replicated_{name}", rank)


def check_kv_memory_falls_as_one_over_r(rank: int, world: int) -> None:
    """Peak K/V bytes a rank holds at a fixed sequence fall as 1/R: K/V at most 3 blocks of
    N/R tokens (own, in hand, arriving), the fp32 dK/dV accumulators at most 4 (in hand,
    leaving, arriving, and the next one started before the leaving one is done); the whole
    sequence's K/V never sits on one rank."""
    n, h, d = 64, 2, 8
    pairs, _ = dist.new_subgroups(group_size=2)
    peaks = {}
    for group, size, sub in ((None, world, rank), (pairs, 2, rank % 2)):
        full = [randn(1, n, h, d, seed=s) for s in (31, 32, 33)]
        mine = [shard_sequence(x, sub, ring=size).requires_grad_(True) for x in full]
        KV_MEMORY.reset()
        out = ring_attention(*mine, Ring.over(group), causal=True)
        out.sum().backward()
        peaks[size] = dict(KV_MEMORY.peak)
        del out
    block = 2 * (n // world) * h * d * 4  # k and v of N/R tokens, fp32, for R = world
    whole = block * world
    for size, peak in peaks.items():
        blocks = peak["kv"] / (whole / size)
        assert 1 <= blocks <= 3, (size, peak, whole)
        assert peak["dkv"] <= 4 * whole / size, (size, peak)
    assert peaks[world]["kv"] < peaks[2]["kv"] <= whole, peaks
    assert peaks[world]["dkv"] < peaks[2]["dkv"], peaks


# ---------------------------------------------------------------- refusals, on every rank


def check_refusals_raise_on_every_rank(rank: int, world: int) -> None:
    u, r = shapes(world)[0] if shapes(world)[0][1] > 1 else shapes(world)[1]
    use_mesh(u, r)
    q, k, v = (randn(1, 4, 4, 8, seed=s) for s in (1, 2, 3))
    short = [t[:, :3] if rank == world - 1 else t for t in (q, k, v)]
    with pytest.raises(ShardMismatchError, match=r"q.shape\[1\] differs"):
        DistributedAttention(4, 8)(*short)
    for backends, match in ((("NO_LSE_TEST",), "has no forward_with_lse"),
                            (("LSE_ON_RANK0_TEST",), "has no forward_with_lse"),
                            (("HOOKED_LSE_TEST",), "hooks, which need the whole sequence"),
                            (("SPARSE_LSE_TEST",), "computes a sparse or custom method")):
        with pytest.raises(ShardError, match=match):
            DistributedAttention(4, 8, supported_attention_backends=backends)(q, k, v)
    with pytest.raises(ShardError, match="VSA cannot run with ring > 1"):
        DistributedAttention_VSA(4, 8)(q, k, v, None, gate_compress=q)
    use_mesh(u, r, "zigzag")
    odd = [t[:, :3] for t in (q, k, v)] if u == 1 else [t[:, :1] for t in (q, k, v)]
    with pytest.raises(LayoutError, match="even number of tokens"):
        DistributedAttention(4, 8)(*odd)
    out, _ = DistributedAttention(4, 8)(q, k, v)  # still in step after every refusal
    assert out.shape == q.shape
    with pytest.raises(SequenceParallelError, match=f"ulysses=3 x ring=1 = 3 is not the world "
                                                    f"size {world}"):
        init_sequence_parallel(ulysses=3, ring=1)
    with pytest.raises(SequenceParallelError, match="group=/size= and ulysses="):
        init_sequence_parallel(size=2, ring=2)


def _length_rules(rank: int, short: int, first: str) -> str:
    """An override manifest (a file of this rank's): `first` for queries of at most `short`
    rows on CPU, TORCH_SDPA beyond."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix=f"ring-rules-{rank}-"), "rules.yaml")
    with open(path, "w") as f:
        f.write(f"schema: 1\nrules:\n  - platform: cpu\n    seq_len: '<={short}'\n"
                f"    rank: [{first}, TORCH_SDPA]\n  - platform: cpu\n    rank: [TORCH_SDPA]\n")
    return path


def check_backends_are_chosen_at_the_piece_lengths_they_run(rank: int, world: int) -> None:
    """Zigzag ring pieces are half-blocks: a seq_len rule choosing a backend without lse for
    them (while the block's own length gets TORCH_SDPA) raises on every rank, naming the
    backend, the rule and the piece length, instead of silently running the reference; a rule
    choosing REFERENCE (which has lse) for them runs and equals single-process attention."""
    u, r = (1, world) if world < 8 else (2, 4)
    n = 8 * world // u  # block U*S = 8 rows, zigzag half-blocks of 4
    q, k, v = (randn(1, n // world, 4, 8, seed=s) for s in (1, 2, 3))
    old = os.environ.get("ATTNRT_CAPABILITY")
    try:
        os.environ["ATTNRT_CAPABILITY"] = _length_rules(rank, 4, "NO_LSE_TEST")
        attnrt.clear_caches()
        use_mesh(u, r, "zigzag")
        # Ring rank 0 (zigzag chunks 0 and 2R-1) has 4-row pieces; the last ring rank none.
        names = (r"backend NO_LSE_TEST \(rule .*rules.yaml:3\) for 4-row pieces" if rank == 0
                 else r"(backend NO_LSE_TEST .* for 4-row pieces|a backend on another rank)")
        with pytest.raises(ShardError, match=names + " has no forward_with_lse"):
            DistributedAttention(4, 8, causal=True)(q, k, v)
        os.environ["ATTNRT_CAPABILITY"] = _length_rules(rank, 4, "REFERENCE")
        attnrt.clear_caches()
        compare_layer(rank, world, u, r, "zigzag", n=n, causal=True)
    finally:
        if old is None:
            os.environ.pop("ATTNRT_CAPABILITY", None)
        else:
            os.environ["ATTNRT_CAPABILITY"] = old
        attnrt.clear_caches()


def check_vsa_matches_one_device(rank: int, world: int) -> None:
    """DistributedAttention_VSA under Ulysses (U = world, every rank whole-sequence heads) equals
    the VSA-shaped backend's impl on the whole sequence on one device, outputs and gradients of
    q, k, v and gate_compress (GATED_TEST: attention * sigmoid(gate), behind sequence-reversing
    hooks, which non-causal attention does not see). With ring > 1 it is refused (refusals)."""
    use_mesh(world, 1)
    b, n, h, d = 1, 8 * world, 2 * world, RUN["head_size"]
    full = [randn(b, n, h, d, seed=s) for s in (41, 42, 43, 44)]  # q, k, v, gate
    ref_in = [t.clone().requires_grad_(True) for t in full]
    ref = GatedImpl(h, d, d ** -0.5).forward(*ref_in, None)

    def shard(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(t, rank, ring=1, ulysses=world)

    mine = [low(shard(t)) for t in full]
    layer = DistributedAttention_VSA(h, d, supported_attention_backends=("GATED_TEST",))
    out, rep = layer(*mine[:3], None, gate_compress=mine[3])
    assert rep is None
    rel(out, shard(ref.detach()), f"VSA U{world}: output", rank)
    g = randn(*ref.shape, seed=45)
    (ref * g).sum().backward()
    (out * shard(g)).sum().backward()
    for i, name in enumerate(("q", "k", "v", "gate_compress")):
        rel(mine[i].grad, shard(ref_in[i].grad), f"VSA U{world}: d{name}", rank)


def check_plan_auto_builds_the_planned_mesh(rank: int, world: int) -> None:
    from attnrt.parallel.plan import plan_sp

    sp = init_sequence_parallel(plan="auto", num_heads=2, seq_len=4096, gpus_per_node=2)
    want = plan_sp(world, num_heads=2, seq_len=4096, gpus_per_node=2)
    assert sp.size == want.ulysses, (sp, want)
    assert (sp.usp.ring.size if sp.usp else 1) == want.ring
    compare_layer(rank, world, want.ulysses, want.ring, "contiguous", h=2, causal=True)


CHECKS: dict[str, Callable[[int, int], None]] = {
    name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")
}


# ---------------------------------------------------------------- the process harness


def _worker(rank: int, world: int, port: int, names: list[str], results: Any,
            run: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    os.environ.pop("ATTNRT_BACKEND", None)
    RUN.update(run)
    if run["backend"] == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on shared hosts
        torch.cuda.set_device(rank)
        RUN["device"] = torch.device("cuda", rank)
    dist.init_process_group(run["backend"], init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=run["timeout"]))
    register_test_backends()
    for cls in (NoLseBackend, HookedLseBackend, SparseLseBackend):
        attnrt.register_backend(cls.get_name(), cls)
    out = {}
    for name in names:
        attnrt.clear_caches()
        clear_sequence_parallel()
        init_sequence_parallel()
        try:
            CHECKS[name](rank, world)
            out[name] = "ok"
        except BaseException:  # pytest.fail is one; reported to the parent test with its traceback
            out[name] = traceback.format_exc()
    results.put((rank, out))
    clear_sequence_parallel()
    dist.destroy_process_group()


# What the forkserver imports once for every rank it forks: this module (torch, attnrt), what
# the backends' package checks import on the first selection (Triton, FlexAttention) and what
# DistributedAttention's torch.compiler.disable imports (dynamo, sympy); a module that is not
# installed is skipped.
PRELOAD = [__name__, "triton", "torch.nn.attention.flex_attention", "torch._dynamo"]


def run_ring_world(world: int, names: list[str], timeout: float = 50.0,
                   backend: str = "gloo", dtype: torch.dtype = torch.float32,
                   ) -> dict[str, dict[int, str]]:
    """Ranks fork from one forkserver that imported PRELOAD once (each spawned rank would
    import torch and the rest again: seconds of CPU apiece on a small CI machine); once every
    rank has reported, the ranks are ended without waiting for their interpreters to wind
    down. backend "nccl": one GPU a rank, the layers in `dtype`, head size 64 (RUN)."""
    run = {"backend": backend, "dtype": dtype, "head_size": 64 if backend == "nccl" else 8,
           "timeout": max(30, int(timeout / 2))}
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, names, results, run),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline, by_rank = time.monotonic() + timeout, {}
    try:
        while len(by_rank) < world:
            rank, out = results.get(timeout=max(0.1, deadline - time.monotonic()))
            by_rank[rank] = out
    except queue.Empty:
        pass
    finally:
        for p in procs:  # every rank reported (or time ran out): nothing left to wait for
            p.kill()
            p.join(timeout=5.0)
    missing = f"no result from this rank within {timeout:.0f} s (hung or crashed)"
    return {name: {r: by_rank.get(r, {}).get(name, missing) for r in range(world)}
            for name in names}


__all__ = ["CHECKS", "run_ring_world", "sp_mod"]
