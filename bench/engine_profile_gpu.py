"""Where an AttentionEngine call's time goes on the GPU: device time of its kernels against the
wall time of the call, per case, and the registers/spills of every Triton kernel compiled.

Shapes: B=1, H=24, D=128, bf16, N=8192 (--n to change). Cases: ALiBi (AttentionLibrary), the
engine with no modification, sigmoid attention, and our dense flash_attention as the peer.
Prints tables; asserts nothing.

    python bench/engine_profile_gpu.py [--n 8192]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable

import torch

B, H, D = 1, 24, 128


def profile_case(name: str, fn: Callable[[], object], n: int, calls: int = 5) -> None:
    """Wall ms per call (CUDA events around `calls` calls) vs the kernels' device ms per call."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) * 1e3 / calls  # enqueue time of one call
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) * 1e3 / calls
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time / 1e3 / calls
    device = sum(kernels.values())
    tflops = 4 * B * H * n * n * D / device / 1e9 if device else 0.0
    print(f"{name:<28} wall {wall:8.3f} ms  host enqueue {host:7.3f} ms  kernels {device:8.3f} ms"
          f"  ({tflops:5.0f} TFLOP/s dense-equivalent)")
    for kernel, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:4]:
        print(f"    {ms:8.3f} ms  {kernel[:90]}")


def compiled_kernels() -> None:
    """Registers, spills, warps and stages of every Triton kernel compiled in this process."""
    import triton

    print("\ncompiled Triton kernels: name, regs, spills, warps, stages, shared bytes")
    for obj in gc.get_objects():
        if not isinstance(obj, triton.runtime.jit.JITFunction):
            continue
        for entry in getattr(obj, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for kernel in getattr(cache, "values", lambda: [])():
                meta = getattr(kernel, "metadata", None)
                print(f"  {obj.__name__:<28} regs {getattr(kernel, 'n_regs', '?'):>4} "
                      f"spills {getattr(kernel, 'n_spills', '?'):>5} "
                      f"warps {getattr(meta, 'num_warps', '?')} "
                      f"stages {getattr(meta, 'num_stages', '?')} "
                      f"smem {getattr(meta, 'shared', '?')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8192, help="N, the sequence length")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from attnrt.engine.library import AttentionLibrary
    from attnrt.engine.softmax import AttentionEngine
    from attnrt.kernels.flash.launch import flash_attention

    n = args.n
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B={B} H={H} N={n} D={D}"
          " bf16, forward, no grad")
    q, k, v = (torch.randn(B, n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)], device="cuda")
    alibi = AttentionLibrary("AlibiAttention", "None", head_size=D, backend="triton")
    plain = AttentionEngine(None, None, backend="triton")
    sig = AttentionLibrary("SigmoidAttention", "None", head_size=D, backend="triton")
    bias = torch.tensor([-9.0], device="cuda")
    with torch.no_grad():
        profile_case("dense flash_attention", lambda: flash_attention(q, k, v), n)
        profile_case("engine, no modification", lambda: plain(q, k, v), n)
        profile_case("engine ALiBi", lambda: alibi(q, k, v, [slopes]), n)
        profile_case("engine sigmoid", lambda: sig(q, k, v, [bias]), n)
    compiled_kernels()
    return 0


if __name__ == "__main__":
    sys.exit(main())
