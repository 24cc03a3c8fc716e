"""The fake ``triton.experimental.gluon`` modules: gl ops on torch CPU tensors, the hopper
mbarrier / tma / wgmma ops, TensorDescriptor, and `install`, which puts them in sys.modules.

Only in a subprocess (run.py): `install` replaces modules in sys.modules and patches
triton.language.core's `_aggregate` (aggregates become plain classes) for the whole process.
"""

from __future__ import annotations

import sys
import types

import torch

from . import memory, sync
from .memory import Smem, as_tensor, promote

PROGRAM = {"pid": (0, 0, 0), "grid": (1, 1, 1)}


class _CInt(int):
    @property
    def value(self) -> int:
        return int(self)


class _CFloat(float):
    @property
    def value(self) -> float:
        return float(self)


def constexpr(x):
    """gl.constexpr: the value itself, with `.value` as kernels' host code reads it."""
    if isinstance(x, bool):
        return x
    if isinstance(x, int):
        return _CInt(x)
    if isinstance(x, float):
        return _CFloat(x)
    return x


class _Layout:
    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    @classmethod
    def get_default_for(cls, *args, **kwargs) -> _Layout:
        return cls(*args, **kwargs)


class MBarrierLayout(_Layout):
    pass


_ALLOCATIONS = [0]


def allocate_shared_memory(dtype, shape, layout, value=None):
    """A tile of zeros, or (MBarrierLayout) shape[0] barriers named by allocation order."""
    _ALLOCATIONS[0] += 1
    if isinstance(layout, MBarrierLayout):
        name = f"mbarrier allocation {_ALLOCATIONS[0]}"
        return sync.BarrierArray([sync.Barrier(f"{name}[{i}]") for i in range(shape[0])])
    return Smem(torch.zeros([int(s) for s in shape], dtype=dtype))


def _reduce(fn):
    def op(x, axis, keep_dims=False):
        return fn(x, dim=int(axis), keepdim=keep_dims)
    return op


def _sum(x, axis, keep_dims=False):
    dtype = x.dtype if x.is_floating_point() else torch.int32
    return torch.sum(x, dim=int(axis), keepdim=keep_dims, dtype=dtype)


def _float_op(fn):
    return lambda x: fn(as_tensor(x).float())


def _binary(fn):
    return lambda a, b: fn(*promote(a, b))


def _where(cond, a, b):
    return torch.where(as_tensor(cond).bool(), *promote(a, b))


def _language() -> types.ModuleType:
    gl = types.ModuleType("triton.experimental.gluon.language")
    gl.constexpr = constexpr
    for name in ("NVMMADistributedLayout", "DotOperandLayout", "SliceLayout",
                 "NVMMASharedLayout", "BlockedLayout", "SharedLayout"):
        setattr(gl, name, type(name, (_Layout,), {}))
    gl.float16, gl.bfloat16, gl.float32 = torch.float16, torch.bfloat16, torch.float32
    gl.int8, gl.int32, gl.int64 = torch.int8, torch.int32, torch.int64
    gl.shared_memory_descriptor, gl.tensor = Smem, torch.Tensor
    gl.program_id = lambda axis: PROGRAM["pid"][axis]
    gl.num_programs = lambda axis: PROGRAM["grid"][axis]
    gl.arange = lambda a, b, layout=None: torch.arange(int(a), int(b), dtype=torch.int32)
    gl.full = lambda shape, v, dtype, layout=None: torch.full([int(s) for s in shape], v,
                                                              dtype=dtype)
    gl.zeros = lambda shape, dtype, layout=None: torch.zeros([int(s) for s in shape],
                                                             dtype=dtype)
    gl.where = _where
    gl.maximum, gl.minimum = _binary(torch.maximum), _binary(torch.minimum)
    gl.max, gl.sum = _reduce(torch.amax), _sum
    gl.exp2, gl.log2 = _float_op(torch.exp2), _float_op(torch.log2)
    gl.exp, gl.log, gl.sqrt = _float_op(torch.exp), _float_op(torch.log), _float_op(torch.sqrt)
    gl.abs = lambda x: torch.abs(as_tensor(x))
    gl.cdiv = lambda a, b: (a + b - 1) // b
    gl.to_tensor = as_tensor
    gl.convert_layout = lambda x, layout, assert_trivial=False: x
    gl.static_range = lambda *a: range(*[int(x) for x in a])
    gl.allocate_shared_memory = allocate_shared_memory
    gl.load, gl.store = memory.load, memory.store
    gl.warp_specialize = _warp_specialize
    return gl


def _warp_specialize(partitions, warps=None, regs=None) -> None:
    sync.warp_specialize(partitions, warps, regs, program=f" (program {PROGRAM['pid']})")


def wgmma(a, b, acc, use_acc=True, is_async=False, **kwargs):
    """warpgroup_mma: float32 acc (+)= a @ b of two 16-bit operands (registers or tiles)."""
    a = a.data if isinstance(a, Smem) else a
    b = b.data if isinstance(b, Smem) else b
    if a.dtype not in (torch.float16, torch.bfloat16) or b.dtype != a.dtype:
        raise sync.EmulationError(f"wgmma of {a.dtype} x {b.dtype} (needs one 16-bit dtype)")
    if acc.dtype != torch.float32:
        raise sync.EmulationError(f"wgmma into a {acc.dtype} accumulator (needs float32)")
    product = a.float() @ b.float()
    return acc + product if use_acc else product


def _wgmma_wait(n, deps):
    return deps[0] if len(deps) == 1 else tuple(deps)


def _hopper() -> types.ModuleType:
    hop = types.ModuleType("triton.experimental.gluon.language.nvidia.hopper")
    hop.mbarrier = types.SimpleNamespace(
        MBarrierLayout=MBarrierLayout,
        init=lambda bar, count: bar.one.init(count),
        expect=lambda bar, nbytes, pred=True: bar.one.expect(int(nbytes)),
        wait=lambda bar, phase, pred=True, deps=(): bar.one.wait(phase),
        arrive=lambda bar, count=1, pred=True: bar.one.arrive())
    hop.tma = types.SimpleNamespace(async_load=memory.tma_load, store_wait=lambda n: None)
    hop.warpgroup_mma = wgmma
    hop.warpgroup_mma_init = lambda x: x
    hop.warpgroup_mma_wait = _wgmma_wait
    hop.fence_async_shared = lambda: None
    return hop


def _jit(fn=None, **kwargs):
    return (lambda f: f) if fn is None else fn


def modules() -> dict[str, types.ModuleType]:
    """The fake modules by their import names."""
    gl, hop = _language(), _hopper()
    core = types.ModuleType("triton.experimental.gluon.language._core")
    core.builtin = lambda f: f
    nv = types.ModuleType("triton.experimental.gluon.language.nvidia")
    nv.hopper = hop
    gl.nvidia, gl._core = nv, core
    hop_host = types.ModuleType("triton.experimental.gluon.nvidia.hopper")
    hop_host.TensorDescriptor = memory.TensorDescriptor
    hop_host.TensorDescriptorIm2Col = type("TensorDescriptorIm2Col", (), {})
    gnv = types.ModuleType("triton.experimental.gluon.nvidia")
    gnv.hopper = hop_host
    gluon = types.ModuleType("triton.experimental.gluon")
    gluon.jit, gluon.constexpr_function = _jit, lambda f: f
    gluon.language, gluon.nvidia = gl, gnv
    return {"triton.experimental.gluon": gluon, "triton.experimental.gluon.language": gl,
            "triton.experimental.gluon.language._core": core,
            "triton.experimental.gluon.language.nvidia": nv,
            "triton.experimental.gluon.language.nvidia.hopper": hop,
            "triton.experimental.gluon.nvidia": gnv,
            "triton.experimental.gluon.nvidia.hopper": hop_host}


def install() -> None:
    """Puts the fakes in sys.modules (for this process: no uninstall) before any kernel
    module is imported; aggregates become plain classes."""
    import triton.experimental
    import triton.language.core as tlc
    import triton.runtime.interpreter  # noqa: F401 (binds the real core helpers first)

    fakes = modules()
    sys.modules.update(fakes)
    triton.experimental.gluon = fakes["triton.experimental.gluon"]
    tlc._aggregate = lambda cls: cls
    tlc._unwrap_if_constexpr = lambda x: x


LAUNCHED: list[str] = []


def launch(kernel, grid, args, kwargs, key=None) -> None:
    """fast_launch.launch's stand-in: runs every program of the grid in turn."""
    consts = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    grid = tuple(grid) + (1,) * (3 - len(grid))
    PROGRAM["grid"] = grid
    wrapped = tuple(memory.Ptr.of(a) if isinstance(a, torch.Tensor) else a for a in args)
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                PROGRAM["pid"] = (x, y, z)
                sync.Launch.reset()
                _ALLOCATIONS[0] = 0  # barriers named by allocation order within the program
                kernel(*wrapped, **consts)
    LAUNCHED.append(kernel.__name__)
