"""One ring piece's backward on one GPU: TRITON_FLASH_ATTN's kernels vs the fp32 torch formula.

Shapes: B=1, n query rows, m key rows (one ring piece: a block of N/R rows, or half of one
under the zigzag layout), H heads, Hkv kv heads, D head size, bf16.

    python bench/ring_backward_gpu.py            # Wan 2.1 / long-context pieces at R = 2, 4, 8
    python bench/ring_backward_gpu.py --quick    # fewer shapes and calls (< 60 s on an H100)

Per piece: `kernel` = attnrt.parallel.ring_grads' "triton" (flash_attention_backward with the
device's block config, what "auto" picks on CUDA), `torch` = its "torch" (fp32 formula in row
chunks, the CPU/gloo path), `cudnn` = the peer: the backward of dense cuDNN SDPA over the same
piece (autograd, forward excluded), measured in the same run. Columns: ms (median between CUDA
events), TFLOP/s (backward = 2.5 x forward's 4 n m H D, halved on the causal diagonal),
and kernel / cudnn and kernel / torch speed ratios. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

D = 128
CASES = [  # name, N (whole sequence), H, Hkv, causal
    ("wan480p", 32760, 40, 40, False),
    ("wan720p", 75600, 40, 40, False),
    ("causal128k", 131072, 32, 8, True),
]


def timed(fn: Any, iters: int) -> float:
    fn()
    samples = []
    for _ in range(iters):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def piece(n: int, m: int, h: int, hkv: int, causal: bool, iters: int) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnrt.backends.triton_flash import config_for
    from attnrt.kernels.flash.launch import flash_attention
    from attnrt.parallel.ring_grads import torch_backward, triton_backward

    q = torch.randn(1, n, h, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, m, hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = D ** -0.5
    out, lse = flash_attention(q, k, v, causal, scale, return_lse=True)
    dout = torch.randn_like(out)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    kern = triton_backward(scale, config_for(q))
    ref = torch_backward(scale)
    ms_kernel = timed(lambda: kern.grads(q, k, v, out, dout, lse, delta, causal), iters)
    ms_torch = timed(lambda: ref.grads(q, k, v, out, dout.float(), lse, delta, causal),
                     max(1, iters // 3))
    # cuDNN takes no GQA: its K/V repeated to H heads (the peer's usual cost).
    kx, vx = (t.repeat_interleave(h // hkv, 2) for t in (k, v))
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_(True) for t in (q, kx, vx))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    g = dout.transpose(1, 2)
    ms_cudnn = timed(lambda: torch.autograd.grad(o, (qt, kt, vt), g, retain_graph=True), iters)
    flops = 10.0 * n * m * h * D * (0.5 if causal else 1.0)
    tf = [flops / ms / 1e9 for ms in (ms_kernel, ms_torch, ms_cudnn)]
    return (f"n={n:<6} m={m:<6} H={h}/{hkv} {'causal' if causal else 'full  '} kernel "
            f"{ms_kernel:7.2f} ms {tf[0]:5.0f} TF | torch {ms_torch:8.2f} ms {tf[1]:5.0f} TF | "
            f"cudnn {ms_cudnn:7.2f} ms {tf[2]:5.0f} TF | kernel/cudnn {ms_cudnn / ms_kernel:4.2f}x"
            f"  kernel/torch {ms_torch / ms_kernel:5.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="R = 4 only, 3 calls (< 60 s)")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()
    iters = args.iters or (3 if args.quick else 10)
    rings = (4,) if args.quick else (2, 4, 8)
    print(f"ring_backward_gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"bf16, D={D}")
    for name, n_full, h, hkv, causal in CASES:
        for r in rings:
            block = n_full // r
            # A full block piece (contiguous layout), or zigzag's half-block diagonal-free one.
            n, m = (block // 2, block) if causal else (block, block)
            print(f"{name:<11} R={r} " + piece(n, m, h, hkv, False, iters))
            if causal:
                print(f"{name:<11} R={r} " + piece(block // 2, block // 2, h, hkv, True, iters))


if __name__ == "__main__":
    main()
