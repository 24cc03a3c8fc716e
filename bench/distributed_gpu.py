"""Ulysses SP=P (DistributedAttention over NCCL) against one GPU (LocalAttention), bf16, D=128.

Shapes: B=1, N sequence, H heads, D=128. For each (N, H) one run prints:

    single     LocalAttention(H) on [1, N, H, D] on one GPU (every rank times its own; rank 0's)
    half       LocalAttention(H/P) on [1, N, H/P, D]: the compute floor of one rank's share
    a2a        one all-to-all of a q shard [1, N/P, H, D] -> [1, N, H/P, D]; GB/s per rank counts
               the bytes each rank sends to the others, (P-1)/P of its shard
    sp c=K     DistributedAttention forward, heads exchanged in K chunks (K=1: no overlap),
               slowest rank's median; speedup = single / sp
    nocheck    the best K without the per-forward shape check (its cost)

    python bench/distributed_gpu.py                        # spawns 2 ranks on GPUs 0 and 1
    torchrun --nproc_per_node=2 bench/distributed_gpu.py   # the same under torchrun
    python bench/distributed_gpu.py --device cpu --shapes 256x4 --iters 2   # gloo smoke test

Inputs are fresh torch.randn per shape; timings are CUDA-event medians after warm-up, with a
barrier before every timed call so the ranks start together. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
D = 128
# NVLink multicast stays off on shared hosts (the device notes explain why).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def _ensure_attnrt() -> None:
    """Stop with the install command when attnrt is not importable."""
    if importlib.util.find_spec("attnrt") is None:
        raise SystemExit("attnrt is not installed: run `pip install --no-deps "
                         "--no-build-isolation -e .` in the repo first (bench/gpu_checks.sh does)")


def _timer(fn: Callable[[], Any], args: argparse.Namespace, device: Any) -> float:
    """Median milliseconds of fn over args.iters calls, all ranks starting each call together."""
    import torch
    import torch.distributed as dist

    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _slowest(ms: float, device: Any) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _measure_shape(n: int, h: int, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    from attnrt.distributed import init_sequence_parallel, start_seq_to_heads
    from attnrt.distributed_layers import DistributedAttention

    sp = init_sequence_parallel()
    p = sp.size
    assert n % p == 0, f"N={n} must divide by P={p} here (padding is the tests' business)"
    row: dict[str, Any] = {"N": n, "H": h, "P": p}
    with torch.no_grad():
        shard = _measure_local(row, args, device, sp.rank)
        a2a_ms = _slowest(_timer(lambda: start_seq_to_heads(shard[0], sp).wait(), args, device),
                          device)
        sent = shard[0].numel() * shard[0].element_size() * (p - 1) / p
        row.update(a2a_ms=a2a_ms, a2a_gbps=sent / (a2a_ms * 1e-3) / 1e9)
        _measure_sp(row, shard, args, device, DistributedAttention)
    return row


def _measure_local(row: dict[str, Any], args: argparse.Namespace, device: Any,
                   rank: int) -> list[Any]:
    """Single-GPU and per-rank-share times; returns this rank's shards of fresh q, k, v."""
    import torch

    from attnrt.layers import LocalAttention

    n, h, p = row["N"], row["H"], row["P"]
    full = [torch.randn(1, n, h, D, device=device, dtype=_dtype(device)) for _ in range(3)]
    single = LocalAttention(h, D)
    row["single_ms"] = _timer(lambda: single(*full), args, device)
    row["backend"] = single.backend_name
    half = LocalAttention(h // p, D)
    part = [t[:, :, :h // p].contiguous() for t in full]
    row["half_ms"] = _timer(lambda: half(*part), args, device)
    s = n // p
    return [t[:, rank * s:(rank + 1) * s].contiguous() for t in full]


def _dtype(device: Any) -> Any:
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _measure_sp(row: dict[str, Any], shard: list[Any], args: argparse.Namespace, device: Any,
                layer_cls: type) -> None:
    from attnrt.distributed import init_sequence_parallel

    best = None
    for chunks in args.chunks:
        init_sequence_parallel(overlap_chunks=chunks)
        layer = layer_cls(row["H"], D)
        ms = _slowest(_timer(lambda layer=layer: layer(*shard), args, device), device)
        row[f"sp_c{chunks}_ms"] = ms
        best = chunks if best is None or ms < row[f"sp_c{best}_ms"] else best
    init_sequence_parallel(overlap_chunks=best, check_shards=False)
    layer = layer_cls(row["H"], D)
    row["nocheck_ms"] = _slowest(_timer(lambda: layer(*shard), args, device), device)
    row["best_chunks"] = best
    row["speedup"] = row["single_ms"] / row[f"sp_c{best}_ms"]
    row["ideal"] = row["single_ms"] / row["half_ms"]


def _table(rows: list[dict[str, Any]], chunks: list[int]) -> str:
    head = (["N", "H", "backend", "single ms", "half ms", "a2a ms", "a2a GB/s/rank"]
            + [f"sp c={c} ms" for c in chunks] + ["nocheck ms", "speedup", "ideal"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["N"], r["H"], r["backend"], f"{r['single_ms']:.2f}", f"{r['half_ms']:.2f}",
                 f"{r['a2a_ms']:.3f}", f"{r['a2a_gbps']:.1f}",
                 *(f"{r[f'sp_c{c}_ms']:.2f}" for c in chunks), f"{r['nocheck_ms']:.2f}",
                 f"{r['speedup']:.3f}x (c={r['best_chunks']})", f"{r['ideal']:.3f}x"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _run(rank: int, world: int, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    _ensure_attnrt()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank,
                            world_size=world)
    rows = [_measure_shape(n, h, args, device) for n, h in args.shapes]
    if rank == 0:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(f"\nSP={world} on {name}, torch {torch.__version__}, "
              f"{str(_dtype(device)).replace('torch.', '')}, D={D}, B=1")
        print(_table(rows, args.chunks))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "distributed_gpu.json").write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="16384x24,32760x40,75600x24", help="NxH,NxH,...")
    ap.add_argument("--chunks", default="1,2,4", help="overlap chunk counts to time")
    ap.add_argument("--world", type=int, default=2, help="ranks to spawn without torchrun")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    args.chunks = [int(c) for c in args.chunks.split(",")]
    return args


def main() -> None:
    args = _parse()
    for key, value in SAFE_ENV.items():
        os.environ.setdefault(key, value)
    if "RANK" in os.environ:  # torchrun set the rendezvous
        _run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    mp.spawn(_run, args=(args.world, args), nprocs=args.world)


if __name__ == "__main__":
    main()
