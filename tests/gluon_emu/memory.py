"""Memory of the Gluon emulator: global pointers over torch CPU tensors, shared-memory tiles,
TMA descriptors, loads (zero fill past the bounds) and reduce-adds (clipped to the tensor)."""

from __future__ import annotations

import types

import torch

from .sync import BarrierArray, EmulationError


def as_tensor(x) -> torch.Tensor:
    """A Python scalar as the tensor Gluon would make of it (int32, float32)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, bool):
        return torch.tensor(x)
    if isinstance(x, int):
        return torch.tensor(x, dtype=torch.int32)
    if isinstance(x, float):
        return torch.tensor(x, dtype=torch.float32)
    raise TypeError(f"not a Gluon value: {type(x)}")


def promote(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b as tensors of one dtype (float64 and int64 narrowed as Gluon's 32-bit defaults)."""
    a, b = as_tensor(a), as_tensor(b)
    if a.dtype != b.dtype:
        dtype = torch.promote_types(a.dtype, b.dtype)
        dtype = {torch.float64: torch.float32, torch.int64: torch.int32}.get(dtype, dtype)
        a, b = a.to(dtype), b.to(dtype)
    return a, b


class Ptr:
    """A global pointer: the tensor's whole storage as a flat view, plus element offsets."""

    def __init__(self, flat: torch.Tensor, off) -> None:
        self.flat, self.off = flat, off

    @classmethod
    def of(cls, t: torch.Tensor) -> Ptr:
        n = t.untyped_storage().nbytes() // t.element_size()
        return cls(torch.as_strided(t, (n,), (1,), 0), t.storage_offset())

    def __add__(self, o) -> Ptr:
        return Ptr(self.flat, self.off + o)

    __radd__ = __add__

    def __sub__(self, o) -> Ptr:
        return Ptr(self.flat, self.off - o)


def load(p: Ptr, mask=None, other=0):
    off = p.off
    if not isinstance(off, torch.Tensor):
        if mask is not None and not bool(mask):
            return torch.tensor(other, dtype=p.flat.dtype)
        return p.flat[int(off)].clone()
    off = off.long()
    if mask is None:
        return p.flat[off]
    keep = as_tensor(mask).bool().expand(off.shape)
    values = p.flat[torch.where(keep, off, torch.zeros_like(off))]
    return torch.where(keep, values, torch.tensor(other, dtype=values.dtype))


def store(p: Ptr, value, mask=None) -> None:
    off, value = as_tensor(p.off).long(), as_tensor(value)
    mask_shape = as_tensor(mask).shape if mask is not None else ()
    shape = torch.broadcast_shapes(off.shape, value.shape, mask_shape)
    off, value = off.expand(shape), value.expand(shape)
    if mask is not None:
        keep = as_tensor(mask).bool().expand(shape)
        off, value = off[keep], value[keep]
    p.flat[off.reshape(-1)] = value.reshape(-1).to(p.flat.dtype)


class Smem:
    """A shared-memory tile (a view: index and slice alias the allocation)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)

    def index(self, i) -> Smem:
        return Smem(self.data[int(i)])

    def slice(self, start, length, dim=0) -> Smem:
        return Smem(self.data.narrow(dim, int(start), int(length)))

    def permute(self, order) -> Smem:
        return Smem(self.data.permute(*order))

    def store(self, x: torch.Tensor) -> None:
        self.data.copy_(x.to(self.data.dtype))

    def load(self, layout=None) -> torch.Tensor:
        return self.data.clone()


class TensorDescriptor:
    """A 2D TMA descriptor: the strided view it reads, and its box (block_shape)."""

    def __init__(self, t, shape, strides, block_shape, layout) -> None:
        self.tensor = torch.as_strided(t, list(shape), list(strides))
        self.block_shape = list(block_shape)
        self.layout = layout
        self.dtype = t.dtype
        nbytes = block_shape[0] * block_shape[1] * t.element_size()
        self.block_type = types.SimpleNamespace(nbytes=nbytes)


def _clip(desc: TensorDescriptor, coord, rows: int, cols: int) -> tuple[int, int, int, int]:
    r, c = int(coord[0]), int(coord[1])
    return r, c, min(r + rows, desc.tensor.shape[0]), min(c + cols, desc.tensor.shape[1])


def tma_load(desc: TensorDescriptor, coord, bar: BarrierArray, dst: Smem, pred=True) -> None:
    """The box at coord into dst, zeros past the tensor's bounds; completes the box's bytes
    on bar (the whole box counts, as on the GPU)."""
    rows, cols = desc.block_shape
    r, c, r1, c1 = _clip(desc, coord, rows, cols)
    tile = torch.zeros(rows, cols, dtype=desc.tensor.dtype)
    if r1 > r and c1 > c:
        tile[: r1 - r, : c1 - c] = desc.tensor[r:r1, c:c1]
    if list(dst.data.shape) != [rows, cols]:
        raise EmulationError(f"TMA box {[rows, cols]} into a tile of {list(dst.data.shape)}")
    dst.data.copy_(tile.to(dst.data.dtype))
    bar.one.complete_tx(desc.block_type.nbytes)


def tma_reduce_add(desc: TensorDescriptor, coord, src: Smem, _semantic=None) -> None:
    """cp.reduce.async.bulk add: src's float32 tile added at coord, clipped to the tensor."""
    rows, cols = src.data.shape
    r, c, r1, c1 = _clip(desc, coord, rows, cols)
    if r1 > r and c1 > c:
        desc.tensor[r:r1, c:c1] += src.data[: r1 - r, : c1 - c].float()


def reinterpret(smem: Smem, dtype, shape, layout, _semantic=None) -> Smem:
    """smem's bytes as a [shape] tile of dtype (values are overwritten before being read)."""
    flat = smem.data.reshape(-1).view(torch.uint8)
    n = 1
    for s in shape:
        n *= int(s)
    need = n * torch.empty((), dtype=dtype).element_size()
    if need > flat.numel():
        raise EmulationError(f"reinterpret of {flat.numel()} bytes as {list(shape)} {dtype}")
    return Smem(flat[:need].view(dtype).view([int(s) for s in shape]))
