"""Compile a Triton or Gluon kernel for a GPU arch on a machine without a GPU, specialised on
real arguments exactly as a launch would be (alignment and divisibility of pointers and ints,
constexprs, num_warps/num_stages), and read what the compiler made of it.

Shapes: whatever the kernel takes; the tensors may live on the CPU (only their dtype, data
pointer alignment and strides matter).

    from offline_compile import compile_for, usage
    kernel = compile_for(my_kernel, args, kwargs, arch=90)   # a CompiledKernel
    print(usage(kernel))    # registers, spilled bytes, shared memory, IR counts

It installs a stand-in Triton driver for the call (current device 0, target
GPUTarget("cuda", arch, 32)) and uses the JIT's own warm-up path, so the specialisation is the
one Triton would pick on the GPU. TRITON_INTERPRET must be unset. Checked with Triton 3.6
(the GPU machine's) and 3.9.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any


class _StandInDriver:
    """The part of Triton's driver interface a warm-up compile reads."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> Any:
        import torch

        return torch.device("cpu")

    def get_device_interface(self) -> Any:
        import torch

        return torch.cuda

    def get_benchmarker(self) -> Callable[..., Any]:
        raise RuntimeError("offline compile: no benchmarking without a GPU")


def compile_for(fn: Any, args: tuple, kwargs: dict, arch: int = 90) -> Any:
    """The CompiledKernel of `fn` for these launch arguments on sm`arch` (no launch)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: this compiles for a real GPU arch")
    from triton.runtime.driver import driver

    fn.device_caches.clear()  # binders are made per driver target
    driver.set_active(_StandInDriver(arch))
    try:
        return fn.warmup(*args, grid=(1,), **kwargs)
    finally:
        driver._active = None  # reset_active() would probe for a real GPU driver
        fn.device_caches.clear()


_IR_COUNTS = {
    "convert_layout": r"ttg\.convert_layout",
    "async_copy": r"ttg\.async_copy_global_to_local",
    "tma_load": r"async_tma_copy_global_to_local|tma\.async_copy|async_tma",
    "wgmma": r"ttng\.warp_group_dot\b",
    "local_alloc": r"ttg\.local_alloc",
}


def _cubin_usage(cubin: bytes) -> tuple[str, str]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=False).stdout
    finally:
        os.unlink(f.name)
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (regs.group(1) if regs else "?"), (stack.group(1) if stack else "?")


def wgmma_serialized(kernel: Any) -> bool:
    """Whether ptxas serialises the kernel's wgmma instructions (warning C7512: each waits for
    the previous one, e.g. for lack of registers), which Triton does not report. Reruns ptxas
    -v on the kernel's PTX for its arch (sm_90a for Hopper)."""
    import triton

    arch = getattr(kernel.metadata, "target", None)
    cc = getattr(arch, "arch", 90)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        err = subprocess.run([ptxas, f"-arch=sm_{cc}{'a' if cc == 90 else ''}", "-v", src,
                              "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=False).stderr
    return "C7512" in err


def usage(kernel: Any) -> dict[str, Any]:
    """Registers, spilled (stack) bytes, shared memory and op counts of the TTGIR and PTX."""
    regs, stack = _cubin_usage(kernel.asm["cubin"])
    ttgir, ptx = kernel.asm.get("ttgir", ""), kernel.asm.get("ptx", "")
    out: dict[str, Any] = {"regs": regs, "spill_bytes": stack,
                           "smem": getattr(kernel.metadata, "shared", "?")}
    for name, pattern in _IR_COUNTS.items():
        out[name] = len(re.findall(pattern, ttgir))
    out["ptx_lines"] = ptx.count("\n")
    out["ld_global_v4"] = len(re.findall(r"ld\.global(\.\w+)*\.v4", ptx))
    out["cp_async_16"] = len(re.findall(r"cp\.async\.cg\.shared\.global.*16;", ptx))
    out["ex2"] = len(re.findall(r"ex2\.approx", ptx))
    out["wgmma_serialized"] = bool(out["wgmma"]) and wgmma_serialized(kernel)
    return out


class capture:  # noqa: N801 - used as a context manager, like torch's
    """Within it, every Triton/Gluon launch compiles for sm`arch` and records
    (kernel name, CompiledKernel) in `.kernels` instead of running: host code can run on CPU
    tensors and leave its outputs unwritten."""

    def __init__(self, arch: int = 90) -> None:
        self.arch, self.kernels = arch, []

    def __enter__(self) -> capture:
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise RuntimeError("unset TRITON_INTERPRET: this compiles for a real GPU arch")
        self._run = JITFunction.run
        record = self.kernels

        def run(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            fn.device_caches.clear()  # binders and kernels made for another driver
            try:
                kernel = self._run(fn, *args, grid=grid, warmup=True, **kwargs)
            finally:
                fn.device_caches.clear()
            record.append((fn.__name__, kernel))
            return kernel

        JITFunction.run = run  # type: ignore[method-assign]
        # A compiled kernel launched directly (attnrt.kernels.fast_launch) does nothing.
        self._getitem = CompiledKernel.__getitem__
        CompiledKernel.__getitem__ = lambda kernel, grid: (lambda *a, **k: None)
        driver.set_active(_StandInDriver(self.arch))
        return self

    def __exit__(self, *exc: object) -> None:
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        JITFunction.run = self._run  # type: ignore[method-assign]
        CompiledKernel.__getitem__ = self._getitem
        driver._active = None  # reset_active() would probe for a real GPU driver
