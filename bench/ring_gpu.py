"""Ulysses vs ring vs USP (DistributedAttention over NCCL) against one GPU, bf16, D=128.

Shapes: B=1, N sequence, H heads (Hkv kv heads), D=128, W ranks = U x R.

    torchrun --nproc_per_node=8 bench/ring_gpu.py            # every U x R of 8 GPUs
    torchrun --nproc_per_node=2 bench/ring_gpu.py --quick    # < 60 s on 2 H100s
    torchrun --nproc_per_node=4 bench/ring_gpu.py --check    # correctness over NCCL first

Cases (issue 25): Wan 2.1 14B 480p (32,760 tokens, 40 heads) and 720p (75,600), HunyuanVideo
720p (118,800 tokens, 24 heads), long-context causal (131,072 tokens, 32 / 8 kv heads, zigzag
layout). --quick divides the lengths by 4 and runs 3 timed calls.

Per case and U x R, forward (inference) time of DistributedAttention with TORCH_SDPA
(cuDNN on H100; it returns lse, which the ring needs), median over --iters calls between CUDA
events after a barrier, slowest rank; `single` is LocalAttention on the whole sequence on one
GPU with cuDNN SDPA (the peer, timed by rank 0 in the same run). Columns: ms, speedup =
single / ms, of ideal = speedup / W, TFLOP/s per GPU (4 N^2 H D, halved when causal). Then
bandwidth per rank: an all-to-all of one q shard over all W ranks (bytes each rank sends to the
others) and a ring send/recv of one K/V block to the next rank. --check first compares each
U x R's output and gradients with one GPU at a small shape (fp32, relative L2).
Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on shared hosts

import torch
import torch.distributed as dist

D = 128
CASES = [  # name, N, H, Hkv, causal
    ("wan480p", 32760, 40, 40, False),
    ("wan720p", 75600, 40, 40, False),
    ("hunyuan720p", 118800, 24, 24, False),
    ("causal128k", 131072, 32, 8, True),
]


def shapes_of(world: int) -> list[tuple[int, int]]:
    return [(world // r, r) for r in range(1, world + 1) if world % r == 0]


def timed(fn: Any, iters: int) -> float:
    """Median ms of `iters` calls, slowest rank."""
    samples = []
    for _ in range(iters):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    ms = torch.tensor([statistics.median(samples)], device="cuda")
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms.item())


def single_gpu_ms(n: int, h: int, hkv: int, causal: bool, iters: int) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnrt.layers import LocalAttention

    ms = torch.zeros(1, device="cuda")
    if dist.get_rank() == 0:
        q, k, v = (torch.randn(1, n, x, D, device="cuda", dtype=torch.bfloat16)
                   for x in (h, hkv, hkv))
        layer = LocalAttention(h, D, hkv, causal=causal, supported_attention_backends=(
            "TORCH_SDPA",))
        samples = []
        with torch.no_grad(), sdpa_kernel([SDPBackend.CUDNN_ATTENTION,
                                           SDPBackend.FLASH_ATTENTION]):
            layer(q, k, v)
            for _ in range(iters):
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                layer(q, k, v)
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
        ms[0] = statistics.median(samples)
    dist.broadcast(ms, 0)
    return float(ms.item())


def sp_groups(world: int) -> dict[tuple[int, int, str], Any]:
    """One SequenceParallel per U x R and layout, built once (every rank alike)."""
    from dataclasses import replace

    from attnrt.parallel.groups import init_sequence_parallel

    out = {}
    for u, r in shapes_of(world):
        sp = init_sequence_parallel(ulysses=u, ring=r)
        out[(u, r, "contiguous")] = sp
        out[(u, r, "zigzag")] = sp if sp.usp is None else replace(
            sp, usp=replace(sp.usp, ring=replace(sp.usp.ring, layout="zigzag")))
    return out


def run_case(case: tuple[str, int, int, int, bool], groups: dict[Any, Any], world: int,
             iters: int, quick: bool) -> list[str]:
    from attnrt.parallel.groups import set_sequence_parallel
    from attnrt.parallel.layers import DistributedAttention

    name, n, h, hkv, causal = case
    if quick:
        n //= 4
    n -= n % (2 * world)
    single = single_gpu_ms(n, h, hkv, causal, iters)
    flops = 4.0 * n * n * h * D * (0.5 if causal else 1.0)
    rows = [f"{name:<12} N={n:<7} H={h}/{hkv} {'causal' if causal else ''}  single "
            f"{single:8.2f} ms  {flops / single / 1e9:6.0f} TFLOP/s"]
    s = n // world
    q, k, v = (torch.randn(1, s, x, D, device="cuda", dtype=torch.bfloat16)
               for x in (h, hkv, hkv))
    layout = "zigzag" if causal else "contiguous"
    for u, r in shapes_of(world):
        set_sequence_parallel(groups[(u, r, layout)])
        layer = DistributedAttention(h, D, hkv, causal=causal,
                                     supported_attention_backends=("TORCH_SDPA",))
        kind = "ulysses" if r == 1 else ("ring" if u == 1 else "usp")
        try:
            with torch.no_grad():
                layer(q, k, v)
                ms = timed(lambda layer=layer: layer(q, k, v), iters)
        except Exception as exc:  # noqa: BLE001 - a shape that cannot run is a table row
            rows.append(f"  {kind:<8} {u}x{r}: {type(exc).__name__}: {str(exc)[:90]}")
            continue
        speedup = single / ms
        rows.append(f"  {kind:<8} {u}x{r:<3} {ms:8.2f} ms  speedup {speedup:5.2f}x  of ideal "
                    f"{speedup / world:5.2f}  {flops / world / ms / 1e9:6.0f} TFLOP/s per GPU")
    return rows


def bandwidth(world: int, n: int, h: int, iters: int) -> list[str]:
    """GB/s per rank: all-to-all of a q shard; ring send/recv of a K/V block."""
    s = n // world
    shard = torch.randn(world, s * h * D // world, device="cuda", dtype=torch.bfloat16)
    recv = torch.empty_like(shard)
    a2a = timed(lambda: dist.all_to_all_single(recv, shard), iters)
    sent = shard.numel() * 2 * (world - 1) / world
    block = torch.randn(2, s, h, D, device="cuda", dtype=torch.bfloat16)
    into = torch.empty_like(block)
    rank = dist.get_rank()

    def p2p() -> None:
        ops = [dist.P2POp(dist.isend, block, (rank + 1) % world),
               dist.P2POp(dist.irecv, into, (rank - 1) % world)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    ring = timed(p2p, iters)
    return [f"bandwidth per rank (W={world}): all-to-all {sent / a2a / 1e6:7.1f} GB/s "
            f"({a2a:.3f} ms), ring p2p {block.numel() * 2 / ring / 1e6:7.1f} GB/s "
            f"({ring:.3f} ms)"]


def check(groups: dict[Any, Any], world: int) -> list[str]:
    """Each U x R against one GPU at N = 64 W, fp32: output and dq (relative L2)."""
    from attnrt.layers import LocalAttention
    from attnrt.parallel.groups import set_sequence_parallel
    from attnrt.parallel.layers import DistributedAttention
    from attnrt.parallel.zigzag import shard_sequence

    rows, n, h, hkv = [], 64 * world, 8, 2
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, n, x, 64, generator=gen).cuda() for x in (h, hkv, hkv)]
    for (u, r, layout), sp in groups.items():
        set_sequence_parallel(sp)
        causal = layout == "zigzag"
        ref_in = [t.clone().requires_grad_(True) for t in full]
        ref = LocalAttention(h, 64, hkv, causal=causal)(*ref_in)
        ref.sum().backward()
        mine = [shard_sequence(t, dist.get_rank(), ring=r, ulysses=u, layout=layout)
                .requires_grad_(True) for t in full]
        layer = DistributedAttention(h, 64, hkv, causal=causal,
                                     supported_attention_backends=("TORCH_SDPA",))
        out, _ = layer(*mine)
        out.sum().backward()

        def err(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a - b).norm() / b.norm())

        e = max(err(out, shard_sequence(ref.detach(), dist.get_rank(), ring=r, ulysses=u,
                                        layout=layout)),
                err(mine[0].grad, shard_sequence(ref_in[0].grad, dist.get_rank(), ring=r,
                                                 ulysses=u, layout=layout)))
        worst = torch.tensor([e], device="cuda")
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        verdict = "ok" if worst.item() < 1e-5 else "FAIL"
        rows.append(f"check {u}x{r} {layout:<10} causal={causal}: rel L2 {worst.item():.2e} "
                    f"{verdict}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N / 4, 3 calls (< 60 s)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--check", action="store_true", help="compare with one GPU first")
    parser.add_argument("--cases", default=None, help="comma-separated case names")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    world = dist.get_world_size()
    iters = args.iters or (3 if args.quick else 10)
    groups = sp_groups(world)
    rows = [f"ring_gpu: {world} x {torch.cuda.get_device_name()}, torch {torch.__version__}"]
    if args.check:
        torch.backends.cuda.matmul.allow_tf32 = False
        rows += check(groups, world)
    cases = [c for c in CASES if args.cases is None or c[0] in args.cases.split(",")]
    for case in cases:
        rows += run_case(case, groups, world, iters, args.quick)
    rows += bandwidth(world, cases[0][1] // (4 if args.quick else 1), cases[0][2], iters)
    if dist.get_rank() == 0:
        print("\n".join(rows), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
