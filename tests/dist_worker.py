"""Spawned-worker side of the distributed tests: one process group per world, many checks in it.

`run_world(world, names)` starts `world` processes (spawn), each joins one process group (gloo
on CPU, NCCL on GPUs) and runs every named check in order; it returns {check: {rank: "ok" or the
traceback}}. Process start and group setup dominate on a small machine, so one group serves all
the checks of a world. Every wait has a timeout, so a broken exchange fails instead of hanging.

Each check builds the full sequence from one seed on every rank, gives this rank its shard, and
compares DistributedAttention with single-process LocalAttention on the gathered sequence.
"""

from __future__ import annotations

import importlib
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import attnrt
from attnrt.backends.sdpa import sdpa_bnhd, sdpa_with_lse
from attnrt.errors import KernelCompileError
from attnrt.interfaces import AttentionBackend, AttentionImpl
from attnrt.layers import LocalAttention, apply_rotary_emb
from attnrt.parallel import groups as sp_mod
from attnrt.parallel import layers as dl_mod
from attnrt.parallel import shard_check
from attnrt.parallel.groups import (
    SequenceParallelError,
    ShardError,
    ShardMismatchError,
    clear_sequence_parallel,
    init_sequence_parallel,
)
from attnrt.parallel.layers import DistributedAttention, DistributedAttention_VSA
from attnrt.selection.manifest import clear_manifest_cache

# ---------------------------------------------------------------- test backends


class HookedImpl(AttentionImpl):
    """Causal SDPA behind a sequence-reversing preprocess (as VSA's tiling reorders tokens)."""

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "", **extra: Any) -> None:
        self.causal, self.scale = causal, softmax_scale

    def preprocess_qkv(self, qkv: torch.Tensor, attn_metadata: Any) -> torch.Tensor:
        HookedBackend.calls["pre"] += 1
        return qkv.flip(1)

    def postprocess_output(self, output: torch.Tensor, attn_metadata: Any) -> torch.Tensor:
        HookedBackend.calls["post"] += 1
        return output.flip(1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        return sdpa_bnhd(query, key, value, self.causal, self.scale)


class GatedImpl(HookedImpl):
    """VSA-shaped forward(q, k, v, gate_compress, metadata): attention * sigmoid(gate)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # type: ignore[override]
                gate_compress: torch.Tensor, attn_metadata: Any = None) -> torch.Tensor:
        out = sdpa_bnhd(query, key, value, self.causal, self.scale)
        return out * torch.sigmoid(gate_compress)


class HookedBackend(AttentionBackend):
    calls: dict[str, int] = {"pre": 0, "post": 0}

    @staticmethod
    def get_name() -> str:
        return "HOOKED_TEST"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return HookedImpl


class GatedBackend(HookedBackend):  # declares nothing: its forward's signature says it takes a gate
    @staticmethod
    def get_name() -> str:
        return "GATED_TEST"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return GatedImpl


class NoJointBackend(HookedBackend):
    SUPPORTS_REPLICATED_TOKENS = False

    @staticmethod
    def get_name() -> str:
        return "NO_JOINT_TEST"


class FlakyImpl(AttentionImpl):
    """Fails like a kernel that does not compile, in both entry points (no hooks)."""

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "", **extra: Any) -> None:
        pass

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        raise KernelCompileError("FLAKY_TEST does not compile here")

    def forward_with_lse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise KernelCompileError("FLAKY_TEST does not compile here")


class FlakyBackend(HookedBackend):
    @staticmethod
    def get_name() -> str:
        return "FLAKY_TEST"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return FlakyImpl


class LseOnRank0Impl(AttentionImpl):
    """Plain SDPA; only on rank 0 does it also offer forward_with_lse."""

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "", **extra: Any) -> None:
        self.causal, self.scale = causal, softmax_scale
        if dist.get_rank() == 0:
            self.forward_with_lse = self._with_lse

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        return sdpa_bnhd(query, key, value, self.causal, self.scale)

    def _with_lse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return sdpa_with_lse(query, key, value, self.causal, self.scale)


class LseOnRank0Backend(HookedBackend):
    @staticmethod
    def get_name() -> str:
        return "LSE_ON_RANK0_TEST"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return LseOnRank0Impl


def register_test_backends() -> None:
    for cls in (HookedBackend, GatedBackend, NoJointBackend, FlakyBackend, LseOnRank0Backend):
        attnrt.register_backend(cls.get_name(), cls)


# ---------------------------------------------------------------- inputs and comparisons


@dataclass
class Ctx:
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype

    @property
    def tolerance(self) -> tuple[float, float]:
        """(atol, rtol): fp32 within 1e-5 absolute; bf16 at about 5 of its ulps."""
        return (1e-5, 0.0) if self.dtype == torch.float32 else (2e-2, 2e-2)

    def randn(self, *shape: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)  # same seed on every rank: the same tensor
        return torch.randn(*shape, generator=gen).to(self.device, self.dtype)

    def shard(self, t: torch.Tensor, s: int) -> torch.Tensor:
        padded = F.pad(t, (0, 0, 0, 0, 0, s * self.world - t.shape[1]))
        return padded[:, self.rank * s:(self.rank + 1) * s].contiguous()

    def close(self, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        atol, rtol = self.tolerance
        err = (got.float() - want.float()).abs()
        excess = (err - rtol * want.float().abs()).max().item()
        assert excess <= atol, (f"{what}: max error {err.max().item():.3g} exceeds atol {atol} + "
                                f"rtol {rtol} on rank {self.rank}")


def qkv(ctx: Ctx, b: int, n: int, h: int, hkv: int, d: int, seed: int) -> list[torch.Tensor]:
    return [ctx.randn(b, n, h, d, seed=seed), ctx.randn(b, n, hkv, d, seed=seed + 1),
            ctx.randn(b, n, hkv, d, seed=seed + 2)]


def leaves(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in ts]


def rope(ctx: Ctx, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = ctx.randn(n, d // 2, seed=99).float() * 3
    return angles.cos().to(ctx.dtype), angles.sin().to(ctx.dtype)


def compare_run(ctx: Ctx, *, h: int = 4, hkv: int | None = None, n: int = 16, causal: bool = False,
                rep: int = 0, padded_to: int | None = None, rotary: bool = False,
                grads: bool = True) -> None:
    """DistributedAttention vs LocalAttention on the gathered sequence: outputs and gradients."""
    b, d, hkv = 2, 16, hkv or h
    s = -(-(padded_to or n) // ctx.world)
    full = qkv(ctx, b, n, h, hkv, d, seed=1)
    reps = qkv(ctx, b, rep, h, hkv, d, seed=11) if rep else []
    freqs = rope(ctx, n, d) if rotary else None
    ref_in, ref_reps = leaves(full), leaves(reps)
    rq, rk = ref_in[0], ref_in[1]
    if freqs is not None:
        rq, rk = apply_rotary_emb(rq, *freqs), apply_rotary_emb(rk, *freqs)
    joint = [torch.cat([t, r], 1) if rep else t
             for t, r in zip([rq, rk, ref_in[2]], ref_reps or [None] * 3, strict=True)]
    ref = LocalAttention(h, d, hkv, causal=causal)(*joint)
    dist_in = leaves([ctx.shard(t, s) for t in full])
    dist_reps = leaves(reps)
    layer = DistributedAttention(h, d, hkv, causal=causal)
    out, rep_out = layer(*dist_in, original_seq_len=n if s * ctx.world != n else None,
                         replicated_q=dist_reps[0] if rep else None,
                         replicated_k=dist_reps[1] if rep else None,
                         replicated_v=dist_reps[2] if rep else None, freqs_cis=freqs)
    ctx.close(out, ctx.shard(ref[:, :n], s), "output")
    if rep:
        ctx.close(rep_out, ref[:, n:], "replicated output")
    else:
        assert rep_out is None
    if grads:
        _compare_grads(ctx, ref, out, rep_out, ref_in + ref_reps, dist_in + dist_reps, n, s, rep)


def _compare_grads(ctx: Ctx, ref: torch.Tensor, out: torch.Tensor, rep_out: Any,
                   ref_in: list[torch.Tensor], dist_in: list[torch.Tensor], n: int, s: int,
                   rep: int) -> None:
    g = ctx.randn(*ref.shape, seed=7)
    (ref * g).sum().backward()
    loss = (out * ctx.shard(g[:, :n], s)).sum()
    if rep:  # the replicated output (and its loss term) is the same on every rank
        loss = loss + (rep_out * g[:, n:]).sum()
    loss.backward()
    for i, name in enumerate("qkv"):
        ctx.close(dist_in[i].grad, ctx.shard(ref_in[i].grad, s), f"d{name}")
    for i, name in enumerate("qkv"[:len(dist_in) - 3]):
        grad = dist_in[3 + i].grad.clone()
        # Each rank holds its heads' share of a replicated input's gradient; the SP group sums.
        dist.all_reduce(grad, group=sp_mod.get_sequence_parallel().group)
        ctx.close(grad, ref_in[3 + i].grad, f"d replicated_{name}")


# ---------------------------------------------------------------- the checks


def check_basic(ctx: Ctx) -> None:
    compare_run(ctx)


def check_causal(ctx: Ctx) -> None:
    compare_run(ctx, causal=True)


def check_gqa(ctx: Ctx) -> None:
    compare_run(ctx, h=2 * ctx.world, hkv=ctx.world, causal=True)


def check_gqa_fewer_kv_heads_than_ranks(ctx: Ctx) -> None:
    if ctx.world < 2:
        pytest.skip("needs 2 ranks")
    compare_run(ctx, h=2 * ctx.world, hkv=1)  # MQA: the kv head is repeated for every rank
    if ctx.world == 4:
        compare_run(ctx, h=8, hkv=2, causal=True)


def check_replicated(ctx: Ctx) -> None:
    compare_run(ctx, rep=5)


def check_padding(ctx: Ctx) -> None:
    compare_run(ctx, n=13, causal=True)
    compare_run(ctx, n=13, padded_to=16 + ctx.world)  # a whole shard more of padding


def check_rotary(ctx: Ctx) -> None:
    compare_run(ctx, rotary=True)


def check_everything_at_once(ctx: Ctx) -> None:
    compare_run(ctx, h=2 * ctx.world, hkv=ctx.world, n=13, causal=True, rep=3, rotary=True)


def check_rotary_per_shard_rows(ctx: Ctx) -> None:
    b, n, h, d = 1, 16, 2 * ctx.world, 16
    s = n // ctx.world
    q, k, v = qkv(ctx, b, n, h, h, d, seed=5)
    cos, sin = rope(ctx, n, d)
    ref = LocalAttention(h, d)(q, k, v, freqs_cis=(cos, sin))
    layer = DistributedAttention(h, d)
    out, _ = layer(*(ctx.shard(t, s) for t in (q, k, v)),
                   freqs_cis=(ctx.shard(cos[None, :, None], s)[0, :, 0],
                              ctx.shard(sin[None, :, None], s)[0, :, 0]))
    ctx.close(out, ctx.shard(ref, s), "output with per-shard freqs rows")


def check_overlap_chunks(ctx: Ctx) -> None:
    for mode in ("single", "pairwise"):
        for chunks in (1, 2, 4):
            init_sequence_parallel(overlap_chunks=chunks, all_to_all=mode)
            with torch.no_grad():
                compare_run(ctx, h=4 * ctx.world, hkv=2 * ctx.world, n=14, rep=3, causal=True,
                            rotary=True, grads=False)


def check_local_first(ctx: Ctx) -> None:
    """Own shard attended first, merged by lse: same output as LocalAttention, with the
    exchanges local_first_exchanges counts per batch row; where it does not apply (causal,
    padding, a gradient) the layer takes the plain exchange, also exact."""
    h, d = 2 * ctx.world, 16
    for mode in ("single", "pairwise"):
        for backend in ("TORCH_SDPA", "REFERENCE"):
            # NCCL too: the copy engines would replace the collectives counted here.
            init_sequence_parallel(local_first=True, all_to_all=mode, copy_engine=False)
            for hkv in (h, ctx.world, 1):
                full = qkv(ctx, 2, 16, h, hkv, d, seed=hkv)
                ref = LocalAttention(h, d, hkv)(*full)
                layer = DistributedAttention(h, d, hkv, supported_attention_backends=(backend,))
                with torch.no_grad(), count_collectives() as counts:
                    out, _ = layer(*(ctx.shard(t, 16 // ctx.world) for t in full))
                ctx.close(out, ctx.shard(ref, 16 // ctx.world), f"{backend} {mode} hkv={hkv}")
                calls = "all_to_all_single" if mode == "single" else "batch_isend_irecv"
                assert counts[calls] == 2 * local_first_exchanges(ctx.world), counts
    init_sequence_parallel(local_first=True)
    # Shards in [B, H, S, D] memory, as many models keep them: the output is still whole.
    full = qkv(ctx, 2, 16, h, h, d, seed=3)
    ref = LocalAttention(h, d)(*full)
    shards = [ctx.shard(t, 16 // ctx.world).transpose(1, 2).contiguous().transpose(1, 2)
              for t in full]
    with torch.no_grad():
        out, _ = DistributedAttention(h, d)(*shards)
    ctx.close(out, ctx.shard(ref, 16 // ctx.world), "local-first, [B, H, S, D] memory")
    with torch.no_grad():
        compare_run(ctx, h=h, rotary=True, grads=False)
    for kwargs in ({"causal": True}, {"n": 13}):  # neither applies: the plain exchange runs
        with torch.no_grad(), count_collectives() as counts:
            compare_run(ctx, h=h, grads=False, **kwargs)
        assert counts["all_to_all_single"] == 4, (kwargs, counts)
    compare_run(ctx, h=h)  # with gradients: the differentiable exchange


def check_local_first_in_half_precision(ctx: Ctx) -> None:
    h, d, n = 2 * ctx.world, 16, 16
    init_sequence_parallel(local_first=True)
    full = [t.half() for t in qkv(ctx, 2, n, h, h, d, seed=4)]
    ref = LocalAttention(h, d)(*full)
    layer = DistributedAttention(h, d, supported_attention_backends=("TORCH_SDPA",))
    with torch.no_grad(), count_collectives() as counts:
        out, _ = layer(*(ctx.shard(t, n // ctx.world) for t in full))
    assert counts["all_to_all_single"] == local_first_collectives(ctx, rows=2), counts
    err = (out.float() - ctx.shard(ref, n // ctx.world).float()).abs().max().item()
    assert err < 5e-3, err


def check_local_first_survives_a_compile_failure(ctx: Ctx) -> None:
    """A backend failing at run time inside the schedule: the next one takes over on that rank,
    the collectives stay the same, the output stays exact."""
    h, d, n = 2 * ctx.world, 16, 16
    init_sequence_parallel(local_first=True)
    full = qkv(ctx, 2, n, h, h, d, seed=8)
    ref = LocalAttention(h, d)(*full)
    layer = DistributedAttention(h, d, supported_attention_backends=("FLAKY_TEST", "REFERENCE"))
    with torch.no_grad(), count_collectives() as counts:
        out, _ = layer(*(ctx.shard(t, n // ctx.world) for t in full))
    ctx.close(out, ctx.shard(ref, n // ctx.world), "output after a compile failure")
    assert counts["all_to_all_single"] == local_first_collectives(ctx, rows=2), counts


def check_ranks_agree_on_the_schedule(ctx: Ctx) -> None:
    """Rank 0's backend returns lse, the others' do not: every rank takes the plain exchange
    (agreed in the shape check) instead of half of them waiting in a different collective."""
    h, d, n = 2 * ctx.world, 16, 16
    init_sequence_parallel(local_first=True)
    full = qkv(ctx, 2, n, h, h, d, seed=9)
    ref = LocalAttention(h, d)(*full)
    layer = DistributedAttention(h, d, supported_attention_backends=("LSE_ON_RANK0_TEST",))
    with torch.no_grad(), count_collectives() as counts:
        out, _ = layer(*(ctx.shard(t, n // ctx.world) for t in full))
    ctx.close(out, ctx.shard(ref, n // ctx.world), "output with the plain exchange")
    assert counts["all_to_all_single"] == 4, counts


def check_local_first_by_default_on_device_groups_only(ctx: Ctx) -> None:
    with torch.no_grad(), count_collectives() as counts:
        compare_run(ctx, h=2 * ctx.world, grads=False)
    on_device = "gloo" not in sp_mod.get_sequence_parallel().backend
    assert counts["all_to_all_single"] == (
        local_first_collectives(ctx, rows=2) if on_device else 4), counts


def local_first_exchanges(world: int) -> int:
    """Collectives per batch row: q, k, v in one (two ranks) or one each; the output back."""
    return 2 if world == 2 else 4


def local_first_collectives(ctx: Ctx, rows: int) -> int:
    """all_to_all calls of a local-first forward: none where the group's copy engines carry it."""
    if sp_mod.get_sequence_parallel().peer_copies is not None:
        return 0
    return rows * local_first_exchanges(ctx.world)


def check_copy_engine_exchange(ctx: Ctx) -> None:
    """Two GPUs that map each other's memory: local-first runs on copy engines (no collective),
    through both buffer slots, back to back and growing the buffer, with LocalAttention's
    outputs. Elsewhere copy_engine=True raises on every rank and None picks NCCL or gloo."""
    if ctx.device.type != "cuda" or ctx.world != 2:
        with pytest.raises(SequenceParallelError, match="copy_engine=True needs a 2-rank NCCL"):
            init_sequence_parallel(copy_engine=True)
        assert init_sequence_parallel().peer_copies is None
        return
    # No shape check, inputs made beforehand: nothing syncs the host between the calls, so
    # the ranks run ahead of each other and the two buffer slots really alternate under load.
    sp = init_sequence_parallel(local_first=True, copy_engine=True, check_shards=False)
    assert sp.peer_copies is not None
    h, d = 4, 64
    layer = DistributedAttention(h, d, supported_attention_backends=("TORCH_SDPA",))
    local = LocalAttention(h, d, supported_attention_backends=("TORCH_SDPA",))
    # 49152 tokens outgrow the first 32 MiB slot: the buffer grows between calls.
    cases = [(16, 1), (64, 2), (64, 2), (256, 4), (49152, 1), (16, 3), *[(64, 2)] * 6]
    inputs = [qkv(ctx, b, n, h, h, d, seed=10 * seed) for seed, (n, b) in enumerate(cases)]
    wants = [ctx.shard(local(*full), n // 2) for full, (n, _) in zip(inputs, cases, strict=True)]
    shards = [[ctx.shard(t, n // 2) for t in full] for full, (n, _) in zip(inputs, cases,
                                                                             strict=True)]
    gqa = DistributedAttention(h, d, num_kv_heads=2, supported_attention_backends=("TORCH_SDPA",))
    gqa_full = qkv(ctx, 2, 96, h, 2, d, seed=7)
    gqa_want = ctx.shard(LocalAttention(h, d, num_kv_heads=2, supported_attention_backends=(
        "TORCH_SDPA",))(*gqa_full), 48)
    gqa_shards = [ctx.shard(t, 48) for t in gqa_full]
    # Poison the allocator's cache: an output element no copy writes would read NaN.
    torch.full((1 << 28,), float("nan"), device=ctx.device, dtype=ctx.dtype)
    torch.cuda.synchronize()
    with torch.no_grad(), count_collectives() as counts:
        outs = [layer(*qkv_shards)[0] for qkv_shards in shards]
        gqa_out = gqa(*gqa_shards)[0]
    for (n, b), out, want in zip(cases, outs, wants, strict=True):
        ctx.close(out, want, f"copy engines, N={n} B={b}")
    ctx.close(gqa_out, gqa_want, "copy engines, GQA 4:2")
    assert counts["all_to_all_single"] == 0, counts
    assert counts["batch_isend_irecv"] == 0, counts
    assert init_sequence_parallel(copy_engine=False).peer_copies is None


def check_one_small_collective_before_the_exchanges(ctx: Ctx) -> None:
    h = 4 * ctx.world
    q, k, v = qkv(ctx, 1, 8, h, h, 16, seed=6)
    for check_shards, checks in ((True, 1), (False, 0)):
        init_sequence_parallel(overlap_chunks=2, check_shards=check_shards)
        layer = DistributedAttention(h, 16)
        with torch.no_grad(), count_collectives() as counts:
            layer(q, k, v)
        gathers = counts["all_gather_single"] + counts["all_gather_into_tensor"]
        assert gathers == checks, counts
        assert counts["all_to_all_single"] == 2 * 4, counts  # 2 chunks x (q, k, v in; out back)


def check_shape_check_on_new_shapes_only(ctx: Ctx) -> None:
    """check_shards="new_shapes": one gather for each new set of shapes (repeats run none),
    and a mismatch on a new set still raises on every rank."""
    h = 2 * ctx.world
    init_sequence_parallel(check_shards="new_shapes")
    layer = DistributedAttention(h, 16)
    gathers = []
    with torch.no_grad():
        for s in (8, 8, 4, 8, 4):
            with count_collectives() as counts:
                layer(*qkv(ctx, 1, s, h, h, 16, seed=s))
            gathers.append(counts["all_gather_single"] + counts["all_gather_into_tensor"])
        assert gathers == [1, 0, 1, 0, 0], gathers
        s = 6 - (ctx.rank == ctx.world - 1)
        with pytest.raises(ShardMismatchError, match=r"q.shape\[1\] differs"):
            layer(*qkv(ctx, 1, s, h, h, 16, seed=3))
        # the refused shapes were not remembered: the next call checks them again
        with count_collectives() as counts, pytest.raises(ShardMismatchError):
            layer(*qkv(ctx, 1, s, h, h, 16, seed=3))
        assert counts["all_gather_single"] + counts["all_gather_into_tensor"] == 1, counts
    with pytest.raises(ValueError, match="check_shards='once' is not allowed"):
        init_sequence_parallel(check_shards="once")


def check_shape_check_on_new_shapes_ignores_per_rank_state(ctx: Ctx) -> None:
    """Known shapes skip the check on every rank even when one rank's own state changed (here:
    whether its backend returns lse, as after a fallback): a key with per-rank state would send
    that rank alone into the gather while the others went on to the exchange."""
    h, n = 2 * ctx.world, 16
    init_sequence_parallel(check_shards="new_shapes", local_first=True)
    full = qkv(ctx, 1, n, h, h, 16, seed=12)
    ref = ctx.shard(LocalAttention(h, 16)(*full), n // ctx.world)
    layer = DistributedAttention(h, 16, supported_attention_backends=("TORCH_SDPA",))
    shards = [ctx.shard(t, n // ctx.world) for t in full]
    saved = dl_mod._lse_ready
    try:
        with torch.no_grad():
            layer(*shards)
            if ctx.rank == 0:
                dl_mod._lse_ready = lambda local, q: False
            with count_collectives() as counts:
                out, _ = layer(*shards)
    finally:
        dl_mod._lse_ready = saved
    assert counts["all_gather_single"] + counts["all_gather_into_tensor"] == 0, counts
    ctx.close(out, ref, "second forward with known shapes")


def check_pairwise_gradients(ctx: Ctx) -> None:
    init_sequence_parallel(all_to_all="pairwise")
    compare_run(ctx, rep=2, n=13)


def check_hooks(ctx: Ctx) -> None:
    b, n, h, d = 1, 13, 2 * ctx.world, 16
    s = -(-n // ctx.world)
    q, k, v = qkv(ctx, b, n, h, h, d, seed=3)
    want = sdpa_bnhd(q.flip(1), k.flip(1), v.flip(1), True, d ** -0.5).flip(1)
    HookedBackend.calls.update(pre=0, post=0)
    layer = DistributedAttention(h, d, causal=True, supported_attention_backends=("HOOKED_TEST",))
    out, _ = layer(*(ctx.shard(t, s) for t in (q, k, v)), original_seq_len=n)
    ctx.close(out, ctx.shard(want, s), "output through preprocess/postprocess hooks")
    assert HookedBackend.calls == {"pre": 1, "post": 1}, HookedBackend.calls


def check_rules_see_the_gathered_length(ctx: Ctx) -> None:
    # A rule keyed on seq_len sees the length the local attention runs (13 real tokens), not
    # this rank's shard (7 or 4): HOOKED_TEST serves, hooks and all, on every rank.
    b, n, h, d = 1, 13, 2 * ctx.world, 16
    s = -(-n // ctx.world)
    q, k, v = qkv(ctx, b, n, h, h, d, seed=3)
    want = sdpa_bnhd(q.flip(1), k.flip(1), v.flip(1), True, d ** -0.5).flip(1)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"attnrt-seq-{os.getpid()}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("schema: 1\nrules:\n  - seq_len: '>=12,<=13'\n    rank: [HOOKED_TEST]\n")
    try:
        attnrt.load_capability(path)
        HookedBackend.calls.update(pre=0, post=0)
        layer = DistributedAttention(h, d, causal=True)
        out, _ = layer(*(ctx.shard(t, s) for t in (q, k, v)), original_seq_len=n)
        ctx.close(out, ctx.shard(want, s), "output of the backend ranked for N=13")
        assert HookedBackend.calls == {"pre": 1, "post": 1}, HookedBackend.calls
    finally:
        attnrt.clear_caches()
        clear_manifest_cache(forget_overrides=True)
        os.remove(path)


def check_local_first_asks_the_backend_of_its_own_lengths(ctx: Ctx) -> None:
    # At the shard's length the rules rank HOOKED_TEST (hooks, no lse), above it TORCH_SDPA.
    # Local-first would run its steps A and C at the shard length, so it must not apply: the
    # plain exchange runs N=16 through TORCH_SDPA, and nothing goes to the reference's lse.
    from attnrt.backends import reference

    h, d, n = 2 * ctx.world, 16, 16
    s = n // ctx.world
    q, k, v = qkv(ctx, 1, n, h, h, d, seed=6)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"attnrt-lf-{os.getpid()}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"schema: 1\nrules:\n  - seq_len: '<={s}'\n    rank: [HOOKED_TEST]\n"
                "  - rank: [TORCH_SDPA]\n")
    real, lse_by_reference = reference.chunked_attention, []
    reference.chunked_attention = lambda *a, **kw: lse_by_reference.append(1) or real(*a, **kw)
    try:
        attnrt.load_capability(path)
        init_sequence_parallel(local_first=True)
        HookedBackend.calls.update(pre=0, post=0)
        with torch.no_grad():
            out, _ = DistributedAttention(h, d)(*(ctx.shard(t, s) for t in (q, k, v)))
        ctx.close(out, ctx.shard(sdpa_bnhd(q, k, v, False, d ** -0.5), s), "plain exchange")
        assert lse_by_reference == []
        assert HookedBackend.calls == {"pre": 0, "post": 0}, HookedBackend.calls
    finally:
        reference.chunked_attention = real
        attnrt.clear_caches()
        clear_manifest_cache(forget_overrides=True)
        os.remove(path)


def check_vsa_gate(ctx: Ctx) -> None:
    b, n, h, d = 1, 16, 2 * ctx.world, 16
    s = n // ctx.world
    q, k, v = qkv(ctx, b, n, h, h, d, seed=4)
    gate = ctx.randn(b, n, h, d, seed=40)
    want = sdpa_bnhd(q, k, v, False, d ** -0.5) * torch.sigmoid(gate)
    HookedBackend.calls.update(pre=0, post=0)
    layer = DistributedAttention_VSA(h, d, supported_attention_backends=("GATED_TEST",))
    out, rep = layer(*(ctx.shard(t, s) for t in (q, k, v)), n,
                     gate_compress=ctx.shard(gate, s))
    ctx.close(out, ctx.shard(want, s), "VSA output with gate_compress")
    assert rep is None
    assert HookedBackend.calls == {"pre": 1, "post": 1}, HookedBackend.calls


def check_groups_of_two_inside_a_larger_world(ctx: Ctx) -> None:
    if ctx.world % 2 or ctx.world == 2:
        pytest.skip("needs a world of 4 or more to split")
    sp = init_sequence_parallel(size=2)  # ranks (0, 1), (2, 3), ...: each group its own sequence
    assert (sp.size, sp.rank) == (2, ctx.rank % 2)
    compare_run(Ctx(sp.rank, sp.size, ctx.device, ctx.dtype), n=13, rep=2, causal=True)


def check_gloo_twin_carries_the_shape_check_of_device_groups(ctx: Ctx) -> None:
    group = dist.group.WORLD
    twin = sp_mod._meta_group(group, "nccl")  # what an NCCL or HCCL group gets
    assert twin is not group
    sp = replace(sp_mod.get_sequence_parallel(), meta_group=twin)
    rows = shard_check.gather_ints([ctx.rank, 7], sp, ctx.device)
    assert rows == [[r, 7] for r in range(ctx.world)]


def check_size_one_group_runs_no_collective(ctx: Ctx) -> None:
    init_sequence_parallel(size=1)
    q, k, v = qkv(ctx, 2, 8, 4, 4, 16, seed=8)
    with count_collectives() as counts:
        out, rep = DistributedAttention(4, 16)(q, k, v)
    assert sum(counts.values()) == 0, counts
    assert rep is None
    assert torch.equal(out, LocalAttention(4, 16)(q, k, v))


# ---------------------------------------------------------------- error checks (every rank)


def check_heads_not_divisible(ctx: Ctx) -> None:
    with pytest.raises(ShardError, match=f"num_heads={ctx.world + 1} .*size {ctx.world}"):
        DistributedAttention(ctx.world + 1, 16)
    with pytest.raises(ShardError, match=r"num_kv_heads=3 cannot be split"):
        DistributedAttention(6 * ctx.world, 16, num_kv_heads=3)


def check_mismatched_shards(ctx: Ctx) -> None:
    layer = DistributedAttention(2 * ctx.world, 16)
    s = 8 - (ctx.rank == ctx.world - 1)  # the last rank passes one token fewer
    q, k, v = qkv(ctx, 1, s, 2 * ctx.world, 2 * ctx.world, 16, seed=2)
    with pytest.raises(ShardMismatchError, match=r"q.shape\[1\] differs .*rank 0: 8"):
        layer(q, k, v)
    rep = ctx.randn(1, 3, 2 * ctx.world, 16, seed=9)
    only_rank0 = rep if ctx.rank == 0 else None
    q, k, v = qkv(ctx, 1, 8, 2 * ctx.world, 2 * ctx.world, 16, seed=2)
    with pytest.raises(ShardMismatchError, match="replicated_q is given differs"):
        layer(q, k, v, replicated_q=only_rank0, replicated_k=only_rank0, replicated_v=only_rank0)
    out, _ = layer(q, k, v)  # the group is still in step after the refusals
    assert out.shape == q.shape


def check_bad_inputs_same_everywhere(ctx: Ctx) -> None:
    h = 2 * ctx.world
    layer = DistributedAttention(h, 16)
    q, k, v = qkv(ctx, 1, 8, h, h, 16, seed=2)
    with pytest.raises(ShardError, match="original_seq_len=99 is not allowed"):
        layer(q, k, v, original_seq_len=99)
    with pytest.raises(ShardError, match=r"k.shape=.* the layer was built for"):
        layer(q, k[:, :, :1], v)
    with pytest.raises(ShardError, match="replicated_k, replicated_v is None"):
        layer(q, k, v, replicated_q=q)
    with pytest.raises(ShardError, match="freqs_cis shapes"):
        layer(q, k, v, freqs_cis=rope(ctx, 5, 16))
    with pytest.raises(ShardError, match="not supported by DistributedAttention_VSA"):
        DistributedAttention_VSA(h, 16)(q, k, v, None, replicated_q=q, replicated_k=k,
                                        replicated_v=v, gate_compress=q)
    with pytest.raises(ShardError, match="TORCH_SDPA does not take gate_compress"):
        DistributedAttention_VSA(h, 16, supported_attention_backends=("TORCH_SDPA",))(
            q, k, v, None, gate_compress=q)


def check_replicated_refused_by_backend(ctx: Ctx) -> None:
    h = 2 * ctx.world
    layer = DistributedAttention(h, 16, supported_attention_backends=("NO_JOINT_TEST",))
    q, k, v = qkv(ctx, 1, 8, h, h, 16, seed=2)
    with pytest.raises(ShardError, match="NO_JOINT_TEST cannot attend replicated tokens"):
        layer(q, k, v, replicated_q=q, replicated_k=k, replicated_v=v)


def check_missing_group(ctx: Ctx) -> None:
    clear_sequence_parallel()
    layer = DistributedAttention(2 * ctx.world, 16)  # building without a group is allowed
    q, k, v = qkv(ctx, 1, 8, 2 * ctx.world, 2 * ctx.world, 16, seed=2)
    with pytest.raises(SequenceParallelError, match=f"world of {ctx.world} processes"):
        layer(q, k, v)


CHECKS: dict[str, Callable[[Ctx], None]] = {
    name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")
}


# ---------------------------------------------------------------- collective counting


class count_collectives:  # noqa: N801 - used as a context manager
    """Counts calls of every torch.distributed collective attnrt.parallel.groups may use."""

    NAMES = ("all_to_all_single", "all_gather_into_tensor", "all_gather_single",
             "batch_isend_irecv", "all_reduce", "barrier")

    def __enter__(self) -> dict[str, int]:
        self.counts = dict.fromkeys(self.NAMES, 0)
        self.saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        for name, fn in self.saved.items():
            setattr(dist, name, self._counting(name, fn))
        return self.counts

    def _counting(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc: object) -> None:
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


# ---------------------------------------------------------------- the process harness


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, names: list[str], backend: str,
            dtype: torch.dtype, results: Any) -> None:
    torch.set_num_threads(1)  # several ranks share few cores
    os.environ.pop("ATTNRT_BACKEND", None)
    device = torch.device("cpu")
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on shared hosts
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    if backend == "launcher":  # as torchrun leaves it: the environment, no process group yet
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        init_sequence_parallel()
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=30))
    register_test_backends()
    ctx, out = Ctx(rank, world, device, dtype), {}
    for name in names:
        attnrt.clear_caches()
        clear_sequence_parallel()
        init_sequence_parallel()
        try:
            _check(name)(ctx)
            out[name] = "ok"
        except pytest.skip.Exception as exc:
            out[name] = f"skip: {exc}"
        except Exception:  # reported to the parent test, which fails with the traceback
            out[name] = traceback.format_exc()
    results.put((rank, out))
    clear_sequence_parallel()
    dist.destroy_process_group()


def _check(name: str) -> Callable[[Ctx], None]:
    """A check of CHECKS by name, or "module:function" for checks kept beside other tests."""
    if ":" not in name:
        return CHECKS[name]
    module, fn = name.split(":")
    return getattr(importlib.import_module(module), fn)  # type: ignore[no-any-return]


def run_world(world: int, names: list[str], backend: str = "gloo",
              dtype: torch.dtype = torch.float32, timeout: float = 80.0,
              ) -> dict[str, dict[int, str]]:
    """Run the named checks on `world` spawned ranks; {check: {rank: "ok" | traceback}}.

    backend "launcher": the ranks get torchrun's environment and init_sequence_parallel()
    initialises torch.distributed itself (gloo here, picked by torch for a CPU-only host).
    """
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    port = free_port()
    procs = [spawn.Process(target=_worker, args=(r, world, port, names, backend, dtype, results),
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
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
    missing = f"no result from this rank within {timeout:.0f} s (hung or crashed)"
    return {name: {r: by_rank.get(r, {}).get(name, missing) for r in range(world)}
            for name in names}


__all__ = ["CHECKS", "count_collectives", "run_world", "sp_mod"]
