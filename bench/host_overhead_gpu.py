"""Per-call cost of a small attention call on a GPU host: raw SDPA vs the impl vs LocalAttention.

Small real calls (N=256, bf16, 24 heads of 128) are host-bound and noisy: a single pass proves
nothing. This times the contenders in interleaved rounds (the order rotates each round), each
round `--calls` back-to-back calls, and prints per contender the median, p10-p90 spread and min
of the per-call time, plus the layer's overhead over raw SDPA as the median of per-round paired
differences. Two clocks: "wall" syncs the device after each batch (what the GPU waits), "host"
is the Python loop alone (what the host spends enqueueing). `--profile` adds a cProfile summary
of the layer's calls (`--profile torch`: torch.profiler's table) to show where host time goes.

    python bench/host_overhead_gpu.py                 # H100: ~20 s
    python bench/host_overhead_gpu.py --quick         # < 10 s
    python bench/host_overhead_gpu.py --profile cprofile
    python bench/host_overhead_gpu.py --device cpu --dtype fp32   # the same on a CPU
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import attnrt
from attnrt.context import get_forward_context

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def contenders(args: argparse.Namespace, device: torch.device
               ) -> tuple[dict[str, Callable[[], object]], attnrt.LocalAttention]:
    shape = (args.batch, args.n, args.heads, args.head_size)
    q, k, v = (torch.randn(shape, device=device, dtype=DTYPES[args.dtype]) for _ in range(3))
    layer = attnrt.LocalAttention(args.heads, args.head_size)
    layer(q, k, v)  # selects for this dtype and device
    impl, meta = layer.impl_for(q.dtype, q.device, args.n), get_forward_context().attn_metadata

    def sdpa() -> object:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2)).transpose(1, 2)

    # "via Module.__call__" is the layer as it was before LocalAttention.__call__ skipped
    # nn.Module's frames: the before and after of that change in one run.
    return {"raw SDPA": sdpa, "impl.forward": lambda: impl.forward(q, k, v, meta),
            "LocalAttention": lambda: layer(q, k, v),
            "via Module.__call__": lambda: nn.Module.__call__(layer, q, k, v)}, layer


def time_rounds(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int,
                calls: int) -> dict[str, dict[str, list[float]]]:
    """{name: {"wall": [us per call per round], "host": [...]}}, interleaved, order rotated."""
    names = list(fns)
    out = {n: {"wall": [], "host": []} for n in names}
    with torch.inference_mode():
        for fn in fns.values():  # warm up: kernels chosen, caches filled
            for _ in range(max(10, calls // 4)):
                fn()
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn = fns[name]
                _sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                host = time.perf_counter()
                _sync(device)
                wall = time.perf_counter()
                out[name]["host"].append((host - start) / calls * 1e6)
                out[name]["wall"].append((wall - start) / calls * 1e6)
    return out


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]


def report(samples: dict[str, dict[str, list[float]]], header: str) -> str:
    lines = [header, f"  {'contender':<20} {'clock':<5} {'median us':>10} {'p10-p90 us':>16} "
                     f"{'min us':>8} {'vs SDPA':>8}"]
    base = samples["raw SDPA"]
    for name, clocks in samples.items():
        for clock, xs in clocks.items():
            ratio = statistics.median(xs) / statistics.median(base[clock])
            lines.append(f"  {name:<20} {clock:<5} {statistics.median(xs):>10.2f} "
                         f"{_pct(xs, .1):>7.2f}-{_pct(xs, .9):<8.2f} {min(xs):>8.2f} "
                         f"{ratio:>7.2f}x")
    for clock in ("wall", "host"):
        diffs = [a - b for a, b in zip(samples["LocalAttention"][clock], base[clock],
                                       strict=True)]
        lines.append(f"  layer overhead over raw SDPA ({clock}, paired per round): median "
                     f"{statistics.median(diffs):.2f} us, p10-p90 {_pct(diffs, .1):.2f} to "
                     f"{_pct(diffs, .9):.2f} us")
    return "\n".join(lines)


def profile(kind: str, fn: Callable[[], object], calls: int, device: torch.device) -> str:
    with torch.inference_mode():
        if kind == "torch":
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                                   if device.type == "cuda" else [])
            with torch_profile(activities=activities) as prof:
                for _ in range(calls):
                    fn()
                _sync(device)
            return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        _sync(device)
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="N, the sequence length")
    parser.add_argument("--heads", type=int, default=24, help="H, heads")
    parser.add_argument("--head-size", type=int, default=128, help="D, the head size")
    parser.add_argument("--batch", type=int, default=1, help="B, the batch")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=200, help="calls per contender per round")
    parser.add_argument("--quick", action="store_true", help="10 rounds of 100 calls")
    parser.add_argument("--profile", choices=("cprofile", "torch"), default=None,
                        help="also print where the layer's host time goes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (default where present) or cpu")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.calls = 10, 100
    device = torch.device(args.device)
    fns, layer = contenders(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    samples = time_rounds(fns, device, args.rounds, args.calls)
    print(report(samples, f"host overhead on {name}, torch {torch.__version__}: B={args.batch} "
                          f"N={args.n} H={args.heads} D={args.head_size} {args.dtype}, "
                          f"backend {layer.backend_name}, {args.rounds} rounds x {args.calls} "
                          "calls"))
    if args.profile:
        print(f"\n--- {args.profile} profile of {args.calls * 5} LocalAttention calls ---")
        print(profile(args.profile, fns["LocalAttention"], args.calls * 5, device))


if __name__ == "__main__":
    main()
