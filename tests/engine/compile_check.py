"""Compile every generated kernel of the example variants for an NVIDIA target without a GPU
(Triton's bundled ptxas), to catch code the interpreter accepts but the compiler refuses.

    python -m tests.engine.compile_check [arch] [names...]     (run without TRITON_INTERPRET)
"""

from __future__ import annotations

import sys
import time

import torch

from attnrt.engine.codegen import KernelFlags, source
from attnrt.engine.kernel import load_module
from tests.engine.cases import CASES

_F32 = {"FIN", "DOOSUM", "DK", "DV", "DQ"}
_I32 = {"DOCQ", "POSQ", "DOCK", "POSK", "FULL_IDX", "FULL_CNT", "PART_IDX", "PART_CNT"}
_CONST = {"HEAD_DIM": 128, "HEAD_DIM_V": 128, "BLOCK_D": 128, "BLOCK_DV": 128, "PREC": "tf32"}


def _signature(fn, inputs: dict[str, torch.dtype], tiles: tuple[int, int]) -> tuple:
    sig, const = {}, dict(_CONST, BLOCK_M=tiles[0], BLOCK_N=tiles[1])
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in _F32 or name.startswith("DIN_"):
            sig[name] = "*fp32"
        elif name in _I32:
            sig[name] = "*i32"
        elif name.startswith("IN_"):
            sig[name] = "*i32" if inputs[name[3:]] == torch.int32 else "*fp32"
        elif name in ("Q", "K", "V", "O", "DO"):
            sig[name] = "*bf16"
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, const


def compile_case(name: str, arch: int) -> float:
    import triton
    from triton.backends.compiler import GPUTarget

    case = CASES[name]()
    engine = case.make("triton")
    q, k, v, custom, layout = case.inputs(1, 64, 2, 16, torch.float32, "cpu")
    inputs = {n: t.dtype for n, t in zip(engine.variant.input_names, custom, strict=True)}
    grads = tuple(n for n, t in zip(engine.variant.input_names, custom, strict=True)
                  if t.is_floating_point())
    scaled = engine.score_mod is None
    flags = KernelFlags("cu_len_q" in layout, scaled, grads)
    module = load_module(source(engine.variant, flags))
    start = time.perf_counter()
    for kernel, tiles, warps, stages in ((module.engine_fwd, (128, 64), 8, 3),
                                         (module.engine_bwd_dkdv, (64, 128), 8, 3),
                                         (module.engine_bwd_dq, (128, 64), 8, 3)):
        sig, const = _signature(kernel, inputs, tiles)
        src = triton.compiler.ASTSource(kernel, sig, const)
        triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": warps, "num_stages": stages})
    return time.perf_counter() - start


def main() -> None:
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    names = sys.argv[2:] or sorted(CASES)
    for name in names:
        print(f"{name}: compiled fwd, dkdv, dq for sm{arch} in {compile_case(name, arch):.1f} s",
              flush=True)


if __name__ == "__main__":
    main()
