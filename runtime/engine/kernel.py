"""Host side of the generated Triton kernels: compile-once module cache, tiles, launches and
the autograd Function.

Shapes: q [B, N, H, D], k [B, M, Hkv, D], v [B, M, Hkv, Dv] -> out [B, N, H, Dv].
Generated modules are cached in-process by their source's digest (the source is a function of
the variant's canonical text, the flags and nothing else) and written once to
$ATTNRT_CACHE_DIR (default ~/.cache/attnrt/engine), where a second process finds the same file
and Triton's own cache finds its compiled binaries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from attnrt.engine import blocks
from attnrt.engine.call import Call
from attnrt.engine.codegen import KernelFlags, source
from attnrt.engine.errors import EngineInputError
from attnrt.engine.reference import RefFns
from attnrt.engine.spec import Variant

_MODULES: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    root = os.environ.get("ATTNRT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "attnrt")
    path = Path(root) / "engine"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_module(text: str) -> ModuleType:
    """The module of generated source `text`, written to the cache directory once."""
    key = hashlib.sha256(text.encode()).hexdigest()[:24]
    if key in _MODULES:
        return _MODULES[key]
    path = cache_dir() / f"engine_{key}.py"
    if not path.exists() or path.read_text() != text:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: a concurrent process sees the old or the new file
    spec = importlib.util.spec_from_file_location(f"attnrt_engine_{key}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    _MODULES[key] = module
    return module


_SOURCES: dict[tuple[str, KernelFlags], ModuleType] = {}


def _module_for(variant: Variant, flags: KernelFlags) -> ModuleType:
    """The module of a variant's kernels; its source is generated once per (variant, flags)."""
    key = (variant.key, flags)
    if key not in _SOURCES:
        _SOURCES[key] = load_module(source(variant, flags))
    return _SOURCES[key]


def clear_modules() -> None:
    _MODULES.clear()
    _SOURCES.clear()


# tanh (soft-capping) as PTX tanh.approx.f32 in the generated kernels for fp16/bf16 inputs on
# NVIDIA GPUs: one special-function op instead of two (bench/NOTES-engine.md run 4). Off until
# a GPU run checks it against the float64 reference (tests/engine, softcap cases) and times it.
FAST_TANH = False


def fast_tanh(variant: Variant, q: torch.Tensor) -> bool:
    """Whether this call's kernels take tanh as tanh.approx.f32 (FAST_TANH, a variant using
    tanh, 16-bit q on an NVIDIA GPU)."""
    return (FAST_TANH and q.is_cuda and torch.version.hip is None
            and q.dtype in (torch.float16, torch.bfloat16) and "tanh(" in variant.text)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch options of one kernel."""

    bm: int
    bn: int
    warps: int = 4
    stages: int = 2


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel on CUDA, by whether the padded head
# size exceeds 128; the dense TRITON_FLASH_ATTN sm90 table's Triton shapes (its Gluon paths
# aside), except dK/dV: compiled offline for sm90 (Triton 3.6, D=128, bf16;
# bench/engine_compile_check.py) its (64, 128, 8 warps, 3 stages) spilled 128-336 bytes of
# registers (plain softmax, ALiBi), (32, 128, 8, 2) none, as in Triton's own fused-attention
# tutorial. dQ shares the forward's tiles, so it walks the forward's block lists.
_CUDA_TILES = {
    "fwd": {False: (128, 64, 8, 3), True: (64, 64, 4, 2)},
    "dq": {False: (128, 64, 8, 3), True: (64, 64, 4, 2)},
    "dkdv": {False: (32, 128, 8, 2), True: (64, 64, 4, 2)},
}


def pick_tiles(device_type: str, d: int, dv: int, block_size: tuple[int, int] | None,
               kernel: str) -> Tiles:
    """Tiles of `kernel` ("fwd", "dq" or "dkdv") for this call: 16 x 16 under the
    interpreter. `block_size` is the call's block-sparse mask granularity where it has one
    (block_sparse_mask / _indices): a tile then divides it. Without a mask the tiles are the
    table's: the mask_mod's block lists are built at tile granularity. A tile cut to 64 rows
    runs one warpgroup (4 warps); an H100 profile showed (64, 64) tiles
    with 8 warps, from cutting the table's tiles to the default block size with no mask, at
    177 TFLOP/s where the dense kernel's Triton path runs ~450 (bench/NOTES-engine.md)."""
    if device_type != "cuda":
        bm, bn, warps, stages = 16, 16, 4, 1
    else:
        bm, bn, warps, stages = _CUDA_TILES[kernel][max(d, dv) > 128]
    if block_size is not None:
        bm, bn = math.gcd(bm, block_size[0]), math.gcd(bn, block_size[1])
    if min(bm, bn) < 16:
        raise EngineInputError(f"block_size={block_size} must be multiples of 16")
    if (bm if kernel != "dkdv" else bn) < 128:
        warps = min(warps, 4)
    return Tiles(bm, bn, warps, stages)


def _lists(fns: RefFns, variant: Variant, call: Call, tiles: Tiles) -> tuple:
    """(fwd/dq lists: full idx, cnt, part idx, cnt; dk/dv lists: the same, transposed)."""
    key = blocks.static_key(call, variant.key, not variant.mask_uses_inputs,
                            (tiles.bm, tiles.bn))

    def make() -> tuple:
        classes = blocks.block_classes(fns, call, tiles.bm, tiles.bn)
        return blocks.block_lists(classes), blocks.block_lists(classes.transpose(-1, -2))

    return blocks.cached_lists(key, make)


def _list_strides(idx: torch.Tensor, cnt: torch.Tensor) -> list[int]:
    bm, hm, r, k = idx.shape
    return [hm * r * k if bm > 1 else 0, r * k if hm > 1 else 0, k,
            hm * r if bm > 1 else 0, r if hm > 1 else 0]


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


class EngineRun:
    """One call's launch state: module, lists, layout, scale; forward() and backward()."""

    def __init__(self, variant: Variant, fns: RefFns, call: Call, scale: float | None,
                 input_grads: tuple[str, ...]) -> None:
        self.variant, self.call, self.scale = variant, call, scale
        self.flags = KernelFlags(call.varlen is not None, scale is not None, input_grads,
                                 fast_tanh(variant, call.q))
        self.module = _module_for(variant, self.flags)
        q, v = call.q, call.v
        mask_blocks = call.block_size if call.block_mask is not None else None
        self.tiles = {name: pick_tiles(q.device.type, q.shape[-1], v.shape[-1], mask_blocks,
                                       name)
                      for name in ("fwd", "dq", "dkdv")}
        self.fwd_lists = _lists(fns, variant, call, self.tiles["fwd"])[0]
        self._fns = fns
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        self.maps = list(call.varlen) if call.varlen is not None else [dummy] * 4

    def _common(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
        d, dv = q.shape[-1], v.shape[-1]
        # fp32 dots in full precision; 16-bit inputs ignore the setting (as triton_flash does)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        return dict(HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), PREC=prec)

    def _input_strides(self, inputs: list[torch.Tensor]) -> list[int]:
        return [s for t in inputs for s in t.stride()]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from attnrt.engine import gluon_forward

        served = gluon_forward.forward(self, q, k, v, inputs)  # None: the Triton forward runs
        if served is not None:
            return served
        b, n, h, _ = q.shape
        m, t = k.shape[1], self.tiles["fwd"]
        out = torch.full((b, n, h, v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
        fin = torch.empty((max(1, len(self.variant.online.finals)), b * h, n),
                          dtype=torch.float32, device=q.device)
        full_idx, full_cnt, part_idx, part_cnt = self.fwd_lists
        grid = (-(-n // t.bm), b * h)
        self.module.engine_fwd[grid](
            q, k, v, out, fin, *self.maps, full_idx, full_cnt, part_idx, part_cnt, *inputs,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            fin.stride(0), *_list_strides(full_idx, full_cnt), *self._input_strides(inputs),
            n, m, h, h // k.shape[2], self.scale if self.scale is not None else 1.0,
            BLOCK_M=t.bm, BLOCK_N=t.bn, num_warps=t.warps, num_stages=t.stages,
            **self._common(q, k, v))
        return out, fin

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 fin: torch.Tensor, inputs: list[torch.Tensor], dout: torch.Tensor) -> tuple:
        from attnrt.engine.kernel_bwd import run_backward

        return run_backward(self, q, k, v, out, fin, inputs, dout)


class EngineFunction(torch.autograd.Function):
    """Differentiable launch: q, k, v and custom inputs -> out [B, N, H, Dv]."""

    @staticmethod
    def forward(ctx: Any, run: EngineRun, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                *inputs: torch.Tensor) -> torch.Tensor:
        out, fin = run.forward(q, k, v, list(inputs))
        ctx.save_for_backward(q, k, v, out, fin, *inputs)
        ctx.run = run
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple:
        q, k, v, out, fin, *inputs = ctx.saved_tensors
        dq, dk, dv, dins = ctx.run.backward(q, k, v, out, fin, inputs, dout.contiguous())
        return (None, dq, dk, dv, *dins)


def run_triton(variant: Variant, fns: RefFns, call: Call, scale: float | None) -> torch.Tensor:
    """Out [B, N, H, Dv] of the generated kernels, differentiable."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
    inputs = [call.inputs[name].contiguous() for name in variant.input_names]
    grads = tuple(name for name, t in zip(variant.input_names, inputs, strict=True)
                  if t.requires_grad and t.is_floating_point() and torch.is_grad_enabled())
    run = EngineRun(variant, fns, call, scale, grads)
    return EngineFunction.apply(run, q, k, v, *inputs)
