"""Where one DistributedAttention forward spends its time on the GPU: a kernel timeline per stream.

Spawns 2 ranks (NCCL), warms up, profiles `--calls` back-to-back forwards of the chosen
schedule with torch.profiler and prints every GPU kernel and copy of them: stream, start and
end (microseconds from the rank's first), and name; each rank in turn. Overlap shows as
intervals on different streams that intersect. Diagnostic only; asserts nothing.

    python bench/distributed_trace_gpu.py --shape 16384x24 --schedule local
    python bench/distributed_trace_gpu.py --shape 16384x24 --schedule local --no-priority
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

D = 128
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def _run(rank: int, world: int, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from attnrt.parallel.groups import init_sequence_parallel
    from attnrt.parallel.layers import DistributedAttention

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    init_sequence_parallel(local_first=args.schedule == "local",
                           priority_exchange=not args.no_priority, check_shards=False)
    n, h = args.shape
    s = n // world
    shard = [torch.randn(1, s, h, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    layer = DistributedAttention(h, D)
    with torch.no_grad():
        for _ in range(3):
            layer(*shard)
        torch.cuda.synchronize()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                layer(*shard)
            torch.cuda.synchronize()
    for turn in range(world):  # one rank prints at a time
        if turn == rank:
            print(f"--- rank {rank}: {args.calls} back-to-back forwards, {args.schedule}, "
                  f"priority_exchange={not args.no_priority}, N={n} H={h}", flush=True)
            _print_timeline(prof, args.min_us)
        dist.barrier()
    dist.destroy_process_group()


def _print_timeline(prof: Any, min_us: float) -> None:
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    if not events:
        print("no GPU events recorded")
        return
    t0 = min(e.time_range.start for e in events)
    print(f"{'stream':>6} {'start us':>9} {'end us':>9} {'dur us':>8}  kernel")
    for e in sorted(events, key=lambda e: e.time_range.start):
        start, end = e.time_range.start - t0, e.time_range.end - t0
        if end - start < min_us:
            continue
        stream = getattr(e, "device_resource_id", "?")
        print(f"{stream:>6} {start:9.0f} {end:9.0f} {end - start:8.0f}  {e.name[:70]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="16384x24", help="NxH")
    ap.add_argument("--schedule", choices=("plain", "local"), default="local")
    ap.add_argument("--no-priority", action="store_true", help="priority_exchange=False")
    ap.add_argument("--calls", type=int, default=3, help="forwards profiled back to back")
    ap.add_argument("--min-us", type=float, default=20.0, help="hide shorter GPU events")
    args = ap.parse_args()
    args.shape = tuple(int(x) for x in args.shape.split("x"))
    for key, value in SAFE_ENV.items():
        os.environ.setdefault(key, value)
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]))
    mp.spawn(_run, args=(2, args), nprocs=2)


if __name__ == "__main__":
    main()
