"""Compile attnrt's linear-attention kernels for a GPU arch offline (no GPU needed) and print
registers and spill bytes per kernel, for the shipped launch configs (chunked.CONFIGS).

Shapes: H heads, Dk = Dv = D head size (B and N are runtime values, not compiled in).

    python bench/linear_compile_check.py                 # sm90, D=128, bf16 and fp32
    python bench/linear_compile_check.py --arch 80 --head-size 64
    python bench/linear_compile_check.py --mod elu1      # each kernel without and with elu+1
                                                         # fused on q and k (fuse_mods="kernel")

Uses Triton's ASTSource / GPUTarget and the cuobjdump Triton ships (checked with Triton 3.9 and
3.6); TRITON_INTERPRET must be unset. A kernel that cannot compile raises here as on a GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
# Pointer arguments of each kernel: "x" = input dtype, "s" = state dtype, "f" = float32.
POINTERS = {
    "states_fwd": {"k": "x", "v": "x", "G": "f", "h": "s", "h0": "f", "ht": "f"},
    "output_fwd": {"q": "x", "k": "x", "v": "x", "G": "f", "h": "s", "o": "x"},
    "states_bwd": {"q": "x", "do": "x", "G": "f", "dh": "s", "dht": "f", "dh0": "f"},
    "dv_bwd": {"q": "x", "k": "x", "v": "x", "do": "x", "G": "f", "dh": "s", "dv": "x"},
    "dqk_bwd": {"q": "x", "k": "x", "v": "x", "do": "x", "G": "f", "h": "s", "dh": "s",
                "dq": "x", "dk": "x", "dg": "f"},
    "states_expand": {"k": "x", "v": "x", "G": "f", "h64": "s", "h16": "s"},
    "grads_expand": {"q": "x", "do": "x", "G": "f", "dh64": "s", "dh16": "s"},
}
MOD_ARGS = ("Q_MOD", "K_MOD", "V_MOD", "Q_GRAD", "K_GRAD", "V_GRAD")
SWITCHES = {"states_fwd": {"HAS_H0": True, "STORE_HT": True},
            "states_bwd": {"HAS_DHT": True, "STORE_DH0": True}}


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


def kernel_mods(mod: str, head_size: int, heads: int) -> dict:
    """{Q_MOD: fn, ...} of `mod` ("elu1", "relu" or "none") fused on q and k, traced and
    generated as the engine does (attnrt.engine.linear_codegen)."""
    import torch.nn.functional as F

    from attnrt.engine.linear_codegen import KERNEL, kernel_mods, plan_mod

    if mod == "none":
        return {}
    fn = {"elu1": lambda t, io: F.elu(t) + 1, "relu": lambda t, io: F.relu(t)}[mod]
    plans = {name: plan_mod(name, fn, (1, 64, heads, head_size)) for name in ("q_mod", "k_mod")}
    if any(p.path != KERNEL for p in plans.values()):
        raise SystemExit(f"--mod {mod} does not fuse: {plans}")
    return {k: v for k, v in vars(kernel_mods(plans)).items() if v is not None}


def compile_kernel(fn, dtype: str, mode: int, head_size: int, heads: int, arch: int,
                   mods: dict | None = None) -> str:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attnrt.kernels.linear import chunked

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    cfg = chunked.config(mode, torch_dtype)
    bt, bk, bv = chunked.blocks(head_size, head_size, mode, torch_dtype)
    sub = cfg.get("BT_STATES", bt) // bt
    consts = {"H": heads, "DK": head_size, "DV": head_size, "BT": bt, "BK": bk, "BV": bv,
              "PREC": "ieee" if dtype == "fp32" else "tf32", **SWITCHES.get(fn.__name__, {})}
    consts.update({n: (mods or {}).get(n) for n in MOD_ARGS if n in fn.arg_names})
    if fn.__name__.endswith("_expand"):
        consts.update(BT=bt * sub, BC=bt)
    else:
        consts.update(G_MODE=mode, SUB=1 if fn.__name__.startswith("states") else sub)
        if sub > 1 and fn.__name__.startswith("states"):
            consts["BT"] = bt * sub
    kinds = {"x": DTYPES[dtype], "s": "*bf16" if dtype == "bf16" else "*fp32", "f": "*fp32"}
    ptrs = {name: kinds[kind] for name, kind in POINTERS[fn.__name__].items()}
    names = fn.arg_names
    signature = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg["num_warps"],
                                     "num_stages": cfg["num_stages"]})
    regs, spills = _usage(kernel.asm["cubin"])
    fused = ",".join(n[0] + n[2:].lower() for n in MOD_ARGS if consts.get(n) is not None)
    return (f"{fn.__name__:13s} {dtype} G_MODE={mode} BT={consts['BT']} BK={bk} BV={bv} "
            f"warps={cfg['num_warps']} mods={fused or '-'}: {regs} registers, {spills} bytes "
            f"spilled")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--mod", default="none", choices=("none", "elu1", "relu"),
                        help="also compile each kernel with this mod fused on q and k")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles for a real GPU arch")
    from attnrt.kernels.linear import chunked_bwd_jit, chunked_expand_jit, chunked_jit

    kernels = (chunked_jit.states_fwd, chunked_jit.output_fwd, chunked_jit.states_bwd,
               chunked_bwd_jit.dv_bwd, chunked_bwd_jit.dqk_bwd)
    expand = (chunked_expand_jit.states_expand, chunked_expand_jit.grads_expand)
    variants = [None] + ([kernel_mods(args.mod, args.head_size, args.heads)]
                         if args.mod != "none" else [])
    for dtype in args.dtypes.split(","):
        for mode in (0, 1, 2):
            for fn in kernels + (expand if mode == 2 else ()):
                for mods in variants:
                    print(compile_kernel(fn, dtype, mode, args.head_size, args.heads,
                                         args.arch, mods), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
