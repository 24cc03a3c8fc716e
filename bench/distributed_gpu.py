"""Ulysses SP=P (DistributedAttention over NCCL) against one GPU (LocalAttention), bf16, D=128.

Shapes: B=1, N sequence, H heads, D=128. For each (N, H) one run prints:

    single     LocalAttention(H) on [1, N, H, D] on one GPU (every rank times its own; rank 0's)
    half       LocalAttention(H/P) on [1, N, H/P, D]: the compute floor of one rank's share
    a2a        one all-to-all of a q shard [1, N/P, H, D] -> [1, N, H/P, D]; GB/s per rank counts
               the bytes each rank sends to the others, (P-1)/P of its shard
    ce         the same bytes as one copy-engine send (attnrt.parallel.peer_copies: peer-to-peer
               memcpy and barrier), where the group has them (2 GPUs of one node)
    plain      DistributedAttention forward, exchange then attend then exchange back
    local      the local-first schedule: own shard attended while the others travel, merged by
               log-sum-exp (the default on device groups for non-causal inference)
    cK         the plain schedule with heads exchanged in K chunks (K-1 of them overlapped)
    .../np     the same without the high-priority NCCL twin (init_sequence_parallel's
               priority_exchange=False)
    .../nocheck  the same without the per-forward shape check (its cost)
    .../new    the same with check_shards="new_shapes" (checked on the first call only here)
    .../nccl   the same with the exchange on NCCL instead of the copy engines
    .../serial the same with local-first's B queued after A on one stream (not on its own)
    speedup    single / the fastest schedule with the check (the shipped default behaviour)

    python bench/distributed_gpu.py                        # spawns 2 ranks on GPUs 0 and 1
    torchrun --nproc_per_node=2 bench/distributed_gpu.py   # the same under torchrun
    python bench/distributed_gpu.py --device cpu --shapes 256x4 --iters 2   # gloo smoke test

Inputs are fresh torch.randn per shape. Each sample is `--calls` back-to-back forwards between
two CUDA events after a barrier (as a model's layers follow each other, so CPU work of call i+1
overlaps GPU work of call i), divided by the count, slowest rank. A sleep kernel of `--lead-ms`
(default 5) is queued before each sample's start event, so the GPUs are busy when it starts and
the sample measures the steady state, as deep in a model; with `--lead-ms 0` they start idle
and the host time of the first call (its shape check included) is timed too. Samples of all
implementations are taken in turn, `--iters` rounds (so clock drift and throttling hit all
alike); medians are printed. Before timing, every schedule's output is compared with the first
one's (bf16, max abs error in the table).
Prints a table; asserts nothing.
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


def _sample(fn: Callable[[], Any], args: argparse.Namespace, device: Any) -> tuple[float, float]:
    """Milliseconds per call of fn over `args.calls` calls back to back, ranks started together:
    (device time, host time to queue the calls); host >= device means the CPU is the limit."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        host = (time.perf_counter() - t0) * 1e3 / args.calls
        return host, host
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if args.lead_ms > 0:  # the GPU waits while the host queues: the sample starts busy
        torch.cuda._sleep(int(args.lead_ms * 2e6))  # ~2 GHz: cycles per millisecond
    start.record()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / args.calls
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / args.calls, host


def _slowest(ms: float, device: Any) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _measure_shape(n: int, h: int, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """Every implementation sampled in turn, iteration after iteration (clock drift and
    thermal throttling then hit all of them alike); medians of the slowest rank's samples."""
    import torch

    from attnrt.layers import LocalAttention
    from attnrt.parallel.groups import (
        init_sequence_parallel,
        set_sequence_parallel,
        start_seq_to_heads,
    )
    from attnrt.parallel.layers import DistributedAttention

    base = init_sequence_parallel()
    p = base.size
    assert n % p == 0, f"N={n} must divide by P={p} here (padding is the tests' business)"
    row: dict[str, Any] = {"N": n, "H": h, "P": p}
    full = [torch.randn(1, n, h, D, device=device, dtype=_dtype(device)) for _ in range(3)]
    single = LocalAttention(h, D, supported_attention_backends=args.backends)
    half = LocalAttention(h // p, D, supported_attention_backends=args.backends)
    part = [t[:, :, :h // p].contiguous() for t in full]
    s = n // p
    shard = [t[:, base.rank * s:(base.rank + 1) * s].contiguous() for t in full]
    runs: dict[str, tuple[Any, Callable[[], Any]]] = {
        "single": (base, lambda: single(*full)), "half": (base, lambda: half(*part)),
        "a2a": (base, lambda: start_seq_to_heads(shard[0], base).wait())}
    sent_part = shard[0].flatten()[:shard[0].numel() * (p - 1) // p]
    if base.peer_copies is not None:
        def ce_send() -> None:
            base.peer_copies.begin({"x": sent_part.numel()}, sent_part.dtype)
            base.peer_copies.send("x", sent_part)
        runs["ce"] = (base, ce_send)
    want = None
    for mode in args.modes:
        sp = init_sequence_parallel(**_schedule(mode))
        layer = DistributedAttention(h, D, supported_attention_backends=args.backends)
        with torch.no_grad():
            got, _ = _flagged(mode, lambda layer=layer: layer(*shard))()
        want = got if want is None else want  # the first mode is the yardstick
        row[f"{mode}_err"] = float((got.float() - want.float()).abs().max())
        runs[mode] = (sp, _flagged(mode, lambda layer=layer: layer(*shard)))
    del got, want
    samples: dict[str, list[float]] = {name: [] for name in runs}
    host: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for sp, fn in runs.values():  # warm-up
            set_sequence_parallel(sp)
            for _ in range(args.warmup):
                fn()
        for _ in range(args.iters):
            for name, (sp, fn) in runs.items():
                set_sequence_parallel(sp)
                ms, host_ms = _sample(fn, args, device)
                samples[name].append(_slowest(ms, device))
                host[name].append(_slowest(host_ms, device))
    for name, values in samples.items():
        row[f"{name}_ms"] = statistics.median(values)
        row[f"{name}_host_ms"] = statistics.median(host[name])
    row["backend"] = single.backend_name
    sent = shard[0].numel() * shard[0].element_size() * (p - 1) / p
    row["a2a_gbps"] = sent / (row["a2a_ms"] * 1e-3) / 1e9
    row["ce_gbps"] = sent / (row["ce_ms"] * 1e-3) / 1e9 if "ce_ms" in row else float("nan")
    checked = [m for m in args.modes  # what ships: checked every forward, not /serial
               if not {"nocheck", "new", "serial"} & set(m.split("/")[1:])]
    row["best"] = min(checked, key=lambda m: row[f"{m}_ms"])
    row["speedup"] = row["single_ms"] / row[f"{row['best']}_ms"]
    row["ideal"] = row["single_ms"] / row["half_ms"]
    return row


def _flagged(mode: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn within what `mode`'s flags switch per call ("serial": local-first queues A, B and C
    on one stream, attnrt.parallel.streams.serial_launches)."""
    from attnrt.parallel.streams import serial_launches

    if "serial" not in mode.split("/")[1:]:
        return fn

    def call() -> Any:
        with serial_launches():
            return fn()
    return call


def _dtype(device: Any) -> Any:
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


_SCHEDULES = {"plain": {"overlap_chunks": 1, "local_first": False},
              "local": {"overlap_chunks": 1, "local_first": True}}


def _schedule(mode: str) -> dict[str, Any]:
    """"plain", "local", "cK" (K head chunks); flags after "/": "np" no high-priority NCCL
    twin, "nocheck" no per-forward shape check, "new" the check on new shapes only, "nccl" no
    copy-engine exchange ("serial" is applied per call, see _flagged)."""
    name, *flags = mode.split("/")
    chosen = dict(_SCHEDULES.get(name) or {"overlap_chunks": int(name[1:]), "local_first": False})
    return {**chosen, "priority_exchange": "np" not in flags,
            "check_shards": ("new_shapes" if "new" in flags else "nocheck" not in flags),
            "copy_engine": False if "nccl" in flags else None}


def _table(rows: list[dict[str, Any]], modes: list[str]) -> str:
    head = (["N", "H", "backend", "single ms", "half ms", "a2a ms", "a2a GB/s/rank",
             "ce GB/s/rank"]
            + [f"{m} ms (err; host ms)" for m in modes] + ["speedup", "ideal"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["N"], r["H"], r["backend"], f"{r['single_ms']:.2f}", f"{r['half_ms']:.2f}",
                 f"{r['a2a_ms']:.3f}", f"{r['a2a_gbps']:.1f}", f"{r['ce_gbps']:.1f}",
                 *(f"{r[f'{m}_ms']:.2f} ({r[f'{m}_err']:.1e}; {r[f'{m}_host_ms']:.2f})"
                   for m in modes),
                 f"{r['speedup']:.3f}x ({r['best']})", f"{r['ideal']:.3f}x"]
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
        print(_table(rows, args.modes))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "distributed_gpu.json").write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="16384x24,32760x40,75600x24", help="NxH,NxH,...")
    ap.add_argument("--modes", default="plain,local/nccl,local,local/new,local/nocheck",
                    help="schedules to time: plain, local, cK (K head chunks), each optionally "
                         "with /np (no priority twin), /nocheck (no shape check), /new (shape "
                         "check on new shapes only), /nccl (no copy engines) or /serial (B "
                         "after A on one stream); the first is "
                         "the yardstick of the error column; "
                         "speedup takes the best one checked every forward (the default)")
    ap.add_argument("--backends", default="",
                    help="comma-separated backends for every layer (default: the manifest's)")
    ap.add_argument("--calls", type=int, default=4, help="back-to-back calls per timed sample")
    ap.add_argument("--lead-ms", type=float, default=5.0,
                    help="keep each GPU busy this long before a sample's start event, so the "
                         "host's queueing of the first call (and its shape check) is not timed: "
                         "steady state, as deep in a model (default 5; 0: start from idle GPUs)")
    ap.add_argument("--world", type=int, default=2, help="ranks to spawn without torchrun")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    args.modes = args.modes.split(",")
    args.backends = tuple(args.backends.split(",")) if args.backends else None
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
