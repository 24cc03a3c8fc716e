"""Compile the block-sparse Gluon forward and backward (runtime/kernels/block_sparse/
gluon_fwd_sm90.py, gluon_bwd_sm90.py) for sm90 offline (no GPU needed) and print registers,
spill bytes and shared memory per variant (H100: 232448 bytes of shared memory per block).

Shapes: B batch, N query length, M key length, H heads, D head size (N, M are runtime values;
the variants differ by mode, block sizes, D, dtype and masking).

    /work/tr36/bin/python bench/block_sparse_gluon_compile_check.py     # Triton 3.6 (the GPU's)
    python bench/block_sparse_gluon_compile_check.py --quick             # any Triton with Gluon
    ... --only backward            # (or forward) one kernel's table

How: the kernel's arguments (host TensorDescriptors over CPU tensors, as `forward` builds them)
go through Triton's own binder (`create_function_from_signature` with the sm90 backend) and
`JITFunction._pack_args`, which give the signature, constexprs and attributes a launch would
compile; `triton.compile(GluonASTSource(...), target=GPUTarget("cuda", 90, 32))` then builds
the cubin, and the cuobjdump Triton ships reads its registers and stack (spill) use. attnrt
must be importable (an `attnrt` symlink to runtime/ on PYTHONPATH for /work/tr36).
TRITON_INTERPRET must be unset. A variant that cannot compile raises here as on a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile


def _usage(cubin: bytes) -> tuple[str, str]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                         text=True, check=False).stdout
    os.unlink(f.name)
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (regs.group(1) if regs else "?"), (stack.group(1) if stack else "?")


def launch_arguments(block_q: int, block_k: int, d: int, dtype, masked: str, stages: int):
    """(args, kwargs) as gluon_fwd_sm90.forward passes them, over CPU tensors; masked:
    "none" (M a multiple of block_k), "tail" (it is not) or "valid" (key_block_valid)."""
    import torch

    from attnrt.kernels.block_sparse import gluon_fwd_sm90 as g

    b, h, hkv = 1, 4, 2
    n = 1000
    m = 1024 if masked != "tail" else 1000
    q = torch.empty((b, n, h, d), dtype=dtype)
    k = torch.empty((b, m, hkv, d), dtype=dtype)
    out, lse = torch.empty_like(q), torch.empty((b, h, n))
    nqb, nkb = -(-n // block_q), -(-m // block_k)
    index = torch.zeros((b, h, nqb, nkb), dtype=torch.int32)
    count = torch.zeros((b, h, nqb), dtype=torch.int32)
    valid = torch.zeros((nkb,), dtype=torch.int32) if masked == "valid" else None
    return _launched(g, lambda: g.forward(q, k, k, index, count, valid, block_q, block_k, 0.1,
                                          out, lse, stages))


def _launched(module, call) -> tuple:
    """(kernel, args, kwargs) that call() hands to `module.launch`, which does not run."""
    captured = {}
    real = module.launch
    module.launch = lambda kernel, grid, args, kwargs, key=None: captured.update(
        kernel=kernel, args=args, kwargs=kwargs)
    try:
        call()
    finally:
        module.launch = real
    return captured["kernel"], captured["args"], captured["kwargs"]


def backward_arguments(block_q: int, block_k: int, d: int, dtype, masked: str):
    """(kernel, args, kwargs) as gluon_bwd_sm90.backward passes them, over CPU tensors (N, M
    tails: N=1000; M=1000 for "tail", else 1024)."""
    import torch

    from attnrt.kernels.block_sparse import gluon_bwd_sm90 as g

    b, h, hkv = 1, 4, 2
    n = 1000
    m = 1024 if masked != "tail" else 1000
    q = torch.empty((b, n, h, d), dtype=dtype)
    k = torch.empty((b, m, hkv, d), dtype=dtype)
    nqb, nkb = -(-n // block_q), -(-m // block_k)
    lse2 = torch.empty((b, h, nqb * block_q))
    k2q = torch.zeros((b, h, nkb, nqb), dtype=torch.int32)
    k2q_count = torch.zeros((b, h, nkb), dtype=torch.int32)
    valid = torch.zeros((nkb,), dtype=torch.int32) if masked == "valid" else None
    return _launched(g, lambda: g.backward(
        q, k, k, q, lse2, lse2, k2q, k2q_count, valid, block_q, block_k, 0.1,
        torch.empty((b, n, h, d)), torch.empty_like(k), torch.empty_like(k)))


def compile_variant(block_q: int, block_k: int, d: int, dtype, masked: str, stages: int,
                    kind: str = "forward"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    if kind == "forward":
        kernel, args, kwargs = launch_arguments(block_q, block_k, d, dtype, masked, stages)
    else:
        kernel, args, kwargs = backward_arguments(block_q, block_k, d, dtype, masked)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    src = GluonASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _table(kind: str, variants) -> None:
    print(f"\n{kind}:")
    print("| mode | block_q x block_k | D | dtype | mask | stages | regs | stack (spill) B "
          "| shared B | warps |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (bq, bk), d, dtype, masked, stages in variants:
        compiled = compile_variant(bq, bk, d, dtype, masked, stages, kind)
        regs, stack = _usage(compiled.asm["cubin"])
        if kind == "forward":
            mode = "split" if bq == 64 else "shared"
        else:
            mode = "whole" if bk == 128 else "pair"
        print(f"| {mode} | {bq}x{bk} | {d} | {str(dtype).removeprefix('torch.')} | {masked} "
              f"| {stages} | {regs} | {stack} | {compiled.metadata.shared} "
              f"| {compiled.metadata.num_warps} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bf16 only, no tail variants")
    parser.add_argument("--stages", type=int, nargs="+", default=[2],
                        help="forward ring slots (the backward has 2)")
    parser.add_argument("--only", choices=["forward", "backward"], default=None)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: this compiles for the GPU")
    import torch
    import triton

    dtypes = [torch.float16, torch.bfloat16] if not args.quick else [torch.bfloat16]
    masks = ["none", "valid"] if args.quick else ["none", "tail", "valid"]
    print(f"Triton {triton.__version__}, target sm90")
    blocks = [(128, 128), (128, 64), (64, 64)]
    if args.only != "backward":
        _table("forward", itertools.product(blocks, (64, 128), dtypes, masks, args.stages))
    if args.only != "forward":
        _table("backward", itertools.product(blocks, (64, 128), dtypes, masks, [2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
