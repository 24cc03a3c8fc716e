"""The U x R planner: how to split W ranks between Ulysses and the ring, with the reason.

Shapes: W ranks, U Ulysses size, R ring size (U x R = W), N sequence, H heads, Hkv kv heads,
D head size; per-rank times in milliseconds from a simple model (below).

    plan_sp(8, num_heads=40, seq_len=75600, gpus_per_node=8)    # -> SpPlan(ulysses=8, ring=1)
    attnrt plan-sp --world 16 --heads 40 --seq-len 75600 --gpus-per-node 8

Rules, in order:
    U <= H, and U splits the heads without padding (H % U == 0, Hkv % U == 0 or U % Hkv == 0);
    a U that needs padding is kept only when nothing else is allowed (attnrt.parallel.usp)
    U divides the GPUs of a node: an all-to-all across nodes runs at network speed on every
    rank, while the ring's one neighbour transfer per step hides behind the attention
    among the allowed shapes, the least modelled time per layer: attention (4 N^2 H D / W
    flops, halved when causal) plus Ulysses' four all-to-alls (q, k, v, out: (U-1)/U of each
    rank's shard, over NVLink inside a node) plus the part of each ring step's K/V transfer
    that the step's attention does not hide (over the network when the ring crosses nodes)
    plus each ring step's fp32 merge and launch cost
The numbers (flops, link speeds) are defaults for H100 nodes (NVLink, 400 Gb/s per GPU
network) and can be passed; the ranking matters more than the times.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

from attnrt.parallel.groups import SequenceParallelError

PEAK_TFLOPS = 400.0  # bf16 attention an H100 sustains, roughly
NVLINK_GBPS = 300.0  # all-to-all bandwidth per rank inside a node (GB/s)
NETWORK_GBPS = 45.0  # per GPU across nodes (400 Gb/s InfiniBand)
HBM_GBPS = 3000.0  # the fp32 merge of each ring step reads and writes the output
RING_STEP_MS = 0.05  # launches and synchronisation per ring step


@dataclass(frozen=True)
class SpPlan:
    """A U x R shape and why; `times` holds the modelled ms per layer of every shape."""

    ulysses: int
    ring: int
    reason: str
    times: tuple[tuple[int, int, float], ...] = ()

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _splits(heads: int, kv_heads: int, u: int) -> bool:
    return heads % u == 0 and (kv_heads % u == 0 or u % kv_heads == 0)


def _model_ms(u: int, r: int, n: int, heads: int, kv_heads: int, head_size: int,
              causal: bool, node: int) -> float:
    world, bytes_ = u * r, 2
    flops = 4.0 * n * n * heads * head_size / world * (0.5 if causal else 1.0)
    attend = flops / (PEAK_TFLOPS * 1e12) * 1e3
    shard = n / world * head_size * bytes_
    a2a_gbps = NVLINK_GBPS if u <= node else NETWORK_GBPS
    a2a = 0.0 if u == 1 else (2 * heads + 2 * kv_heads) * shard * (u - 1) / u / (a2a_gbps * 1e6)
    exposed = 0.0
    if r > 1:
        kv_block = 2 * (n / r) * max(1, kv_heads // u) * head_size * bytes_
        ring_gbps = NVLINK_GBPS if world <= node else NETWORK_GBPS
        step_comm = kv_block / (ring_gbps * 1e6)
        merge = (n / r) * (heads / u) * head_size * 4 * 3 / (HBM_GBPS * 1e6)
        exposed = (r - 1) * max(0.0, step_comm - attend / r) + r * (merge + RING_STEP_MS)
    return attend + a2a + exposed


def plan_sp(world: int, *, num_heads: int | None = None, num_kv_heads: int | None = None,
            seq_len: int | None = None, head_size: int = 128, causal: bool = False,
            gpus_per_node: int | None = None) -> SpPlan:
    """The U x R shape for `world` ranks (module doc). Without num_heads: Ulysses over one
    node's GPUs, ring across nodes. gpus_per_node None: LOCAL_WORLD_SIZE (torchrun), else
    the CUDA devices here, else the world (one node)."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise SequenceParallelError(f"world={world!r} is not allowed; allowed: a positive int")
    node = gpus_per_node or _gpus_per_node(world)
    shapes = [(u, world // u) for u in range(1, world + 1) if world % u == 0]
    if num_heads is None:
        u = max(s for s, _ in shapes if s <= node and node % s == 0)
        return SpPlan(u, world // u, f"no head count given: Ulysses over the {u} GPUs of a "
                      f"node, ring across {world // u} node(s)")
    kv = num_kv_heads or num_heads
    n = seq_len or 32768
    times = tuple((u, r, round(_model_ms(u, r, n, num_heads, kv, head_size, causal, node), 3))
                  for u, r in shapes)
    allowed = [t for t in times if _splits(num_heads, kv, t[0]) and node % t[0] == 0
               and t[0] <= node] or [t for t in times if t[0] <= num_heads] or list(times)
    u, r, ms = min(allowed, key=lambda t: (t[2], -t[0]))
    refused = [f"U={t[0]}" for t in times if t not in allowed]
    why = (f"ulysses {u} x ring {r}: {ms:.3f} ms per layer modelled, the least of the shapes "
           f"that split {num_heads} heads ({kv} kv heads) without padding and keep the "
           f"all-to-all inside a node of {node} GPUs")
    if refused:
        why += f" (not allowed: {', '.join(refused)})"
    return SpPlan(u, r, why, times)


def _gpus_per_node(world: int) -> int:
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local and local.isdigit():
        return int(local)
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return min(world, count) if count else world


PLAN_HELP = "suggest ulysses x ring for sequence parallelism, with the reason"


def add_plan_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--world", type=int, required=True, help="ranks (GPUs) in the SP group")
    p.add_argument("--heads", type=int, default=None, help="query heads H of the model")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default H")
    p.add_argument("--seq-len", type=int, default=None, help="the full sequence length N")
    p.add_argument("--head-size", type=int, default=128, help="head size D (default 128)")
    p.add_argument("--causal", action="store_true", help="causal attention (ring load balance)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs linked by NVLink in one node (Ulysses stays inside a node)")
    return p


def run_plan(args: argparse.Namespace) -> int:
    plan = plan_sp(args.world, num_heads=args.heads, num_kv_heads=args.kv_heads,
                   seq_len=args.seq_len, head_size=args.head_size, causal=args.causal,
                   gpus_per_node=args.gpus_per_node)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    lines = [f"ulysses={plan.ulysses} ring={plan.ring}", plan.reason]
    lines += [f"  U={u:<3} R={r:<3} {ms:9.3f} ms" for u, r, ms in plan.times]
    print("\n".join(lines))
    return 0


__all__ = ["SpPlan", "add_plan_arguments", "plan_sp", "run_plan"]
