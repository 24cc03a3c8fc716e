"""Exchanges between the two GPUs of a one-node SP group on their copy engines.

NCCL's all-to-all runs as a kernel: it needs SMs, and the attention kernel it should overlap
(cuDNN's on Hopper is persistent) holds every SM until it ends. A peer-to-peer memcpy into
memory the peer mapped (torch symmetric memory) runs on a copy engine instead, beside any
kernel, and on H100 NVLink moves 370-390 GB/s where the all-to-all managed 100-150
(bench/NOTES-distributed.md). This is still torch.distributed's machinery: the buffers come
from `torch.distributed._symmetric_memory` and their handles from the group's rendezvous.

    copies = PeerCopies.build(group, device)   # every rank of a 2-rank NCCL group; None if the
                                               # GPUs cannot map each other's memory
    copies.begin({"fwd": n, "back": m}, dtype) # once per call, same sizes on both ranks
    copies.send("fwd", src)                    # on the current stream: src -> peer's inbox
    copies.send_with("fwd", write)             # or write(peer's region) fills it, e.g. with
                                               # copy_rows from strided sources
    copies.inbox("fwd")                        # what the peer sent this call (after `send`)

`copy_rows(dst, src)` copies between two matrices whose rows are contiguous but strided (one
head range of a [S, H, D] tensor) as one 2D memcpy; into the peer's memory it too runs on a
copy engine, so the exchange needs no packing kernel, which a persistent attention kernel
would hold back.

Each rank owns one symmetric buffer of two slots; calls alternate between them. A send is the
memcpy into the peer's slot and then the group's barrier, both on the caller's stream, so the
barrier's end means both ranks' copies of this send have landed. Alternating is what makes
reuse safe: a rank writes slot s again two calls later, after its own barrier of the call in
between, which the peer reaches only once its stream is past everything that read slot s
(callers queue each send on a stream that first waits for all earlier work of the call before).
So calls must go out one at a time from one current stream, and not under CUDA-graph capture.
An error on one rank mid-call must be followed by abandon() there (see its docstring).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("attnrt")

_ALIGN = 256  # bytes: every region starts on a boundary any dtype and the copy engines like
_GROW_STEP = 32 << 20  # a slot grows to what a call needs, rounded up to this


class PeerCopies:
    """Copy-engine exchanges for a two-rank group whose GPUs map each other's memory."""

    def __init__(self, group: Any, device: torch.device, rank: int,
                 agree: Callable[[bool], bool] = bool) -> None:
        self._group, self._device, self._agree = group, device, agree
        self._rank, self._peer = rank, 1 - rank
        self._buffer: torch.Tensor | None = None
        self._handle: Any = None
        self._layout: dict[str, tuple[int, int]] = {}  # kind -> (byte offset in a slot, numel)
        self._dtype = torch.uint8
        self._slot_bytes = 0
        self._slot = 1
        self._unsent: list[str] = []  # kinds of the current call not sent yet, in order

    @property
    def device(self) -> torch.device:
        return self._device

    @classmethod
    def build(cls, group: Any, device: torch.device,
              agree: Callable[[bool], bool]) -> PeerCopies | None:
        """Collective over `group`: a PeerCopies on every rank, or None on every rank (the
        reason logged). `agree(ok)` must return whether `ok` holds on all ranks; it is asked
        before the rendezvous (so no rank waits there for a peer that failed to allocate) and
        after it (so a failed mapping on one rank disables the exchange on both). Growing the
        buffer later asks it the same way."""
        copies = cls(group, device, dist.get_rank(group), agree)
        try:
            copies._setup(_ALIGN)
        except _SETUP_ERRORS as exc:
            _log_unavailable(exc)
            return None
        return copies

    def _setup(self, slot_bytes: int) -> None:
        """Allocate and map a buffer of two `slot_bytes` slots on every rank, or raise the same
        error on every rank (SetupFailed where another rank failed)."""
        try:
            buffer = self._allocate(slot_bytes)
        except _SETUP_ERRORS:
            self._agree(False)
            raise
        if not self._agree(True):
            raise SetupFailed("another rank could not allocate its copy-engine buffer")
        try:
            self._attach(buffer, slot_bytes)
        except _SETUP_ERRORS:
            self._agree(False)
            raise
        if not self._agree(True):
            raise SetupFailed("another rank could not map the copy-engine buffers")

    def _allocate(self, slot_bytes: int) -> torch.Tensor:
        import torch.distributed._symmetric_memory as symm

        return symm.empty(2 * slot_bytes, dtype=torch.uint8, device=self._device)

    def _attach(self, buffer: torch.Tensor, slot_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm

        name = self._group.group_name
        if not symm.is_symm_mem_enabled_for_group(name):
            # Needed by older torch; newer ones (2.11 on the GPU machine) deprecate it as
            # unnecessary but still accept it, and this is the combination measured there.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm.enable_symm_mem_for_group(name)
        handle = symm.rendezvous(buffer, name)  # once: a retry could wait alone
        if handle is None:
            raise RuntimeError("symmetric-memory rendezvous returned no handle")
        self._buffer, self._handle, self._slot_bytes = buffer, handle, slot_bytes

    def _grow(self, slot_bytes: int) -> None:
        # The peer may still copy into the old buffer: drain this device first (the rendezvous
        # is collective, so the peer has drained too once it returns).
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        try:
            self._setup(slot_bytes)
        except _SETUP_ERRORS as exc:
            from attnrt.parallel.groups import SequenceParallelError

            raise SequenceParallelError(
                f"the copy-engine exchange could not grow to {slot_bytes * 2} bytes on every "
                f"rank ({type(exc).__name__}: {exc}); free GPU memory, or pass "
                "copy_engine=False to init_sequence_parallel") from exc

    def begin(self, sizes: dict[str, int], dtype: torch.dtype) -> None:
        """Lay out this call's regions (numel per kind, sent in this order) and move to the
        other slot. Every rank must call it with the same sizes: growing is collective."""
        if self._unsent:
            raise RuntimeError(f"copy-engine call begun while {self._unsent} of the previous "
                               "one were never sent (abandon() them on an error)")
        item = dtype.itemsize
        layout, offset = {}, 0
        for kind, numel in sizes.items():
            layout[kind] = (offset, numel)
            offset += -(-numel * item // _ALIGN) * _ALIGN
        if offset > self._slot_bytes:
            self._grow(-(-offset // _GROW_STEP) * _GROW_STEP)
        self._layout, self._dtype = layout, dtype
        self._slot = 1 - self._slot
        self._unsent = list(sizes)

    def _region(self, rank: int, kind: str) -> torch.Tensor:
        offset, numel = self._layout[kind]
        start = (self._slot * self._slot_bytes + offset) // self._dtype.itemsize
        return self._handle.get_buffer(rank, (numel,), self._dtype, start)

    def inbox(self, kind: str) -> torch.Tensor:
        """This rank's region of `kind` in this call's slot (flat); valid after `send(kind)`."""
        return self._region(self._rank, kind)

    def send(self, kind: str, src: torch.Tensor) -> None:
        """On the current stream: copy contiguous `src` into the start of the peer's region of
        `kind`, then the barrier that tells both ranks their inboxes of `kind` are filled.
        Kinds go in begin()'s order."""
        self.send_with(kind, lambda region: region[:src.numel()].view(src.shape).copy_(src))

    def send_with(self, kind: str, write: Callable[[torch.Tensor], Any]) -> None:
        """send() where `write(region)` fills the peer's region of `kind` (flat, this call's
        dtype) on the current stream; what it queues there lands before the barrier."""
        if not self._unsent or self._unsent[0] != kind:
            raise RuntimeError(f"send({kind!r}) out of order; next expected: {self._unsent}")
        write(self._region(self._peer, kind))
        self._handle.barrier(channel=0)
        self._unsent.pop(0)

    def abandon(self) -> None:
        """After an error on this rank mid-call: send what is left as NaN, so the peer's
        barriers stay paired with this rank's (later calls stay in step) and the peer's output
        of this call is NaN where this rank's part is missing, not silently stale."""
        while self._unsent:
            kind = self._unsent[0]
            region = self._region(self._peer, kind)
            region.fill_(float("nan") if region.is_floating_point() else 0)
            self._handle.barrier(channel=0)
            self._unsent.pop(0)


# ------------------------------------------------------------ strided copies on a copy engine


class _Memcpy2D(ctypes.Structure):
    """CUDA_MEMCPY2D of the driver API (cuda.h); host and array fields stay unused."""

    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t),
                ("srcMemoryType", ctypes.c_int), ("srcHost", ctypes.c_void_p),
                ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t),
                ("dstMemoryType", ctypes.c_int), ("dstHost", ctypes.c_void_p),
                ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


_MEMORYTYPE_DEVICE = 2  # CU_MEMORYTYPE_DEVICE: a device (or, with unified addressing, peer) pointer
_MAX_PITCH = 1 << 31  # below every GPU's CU_DEVICE_ATTRIBUTE_MAX_PITCH


@functools.cache
def _memcpy_2d_async() -> Any:
    """The driver's cuMemcpy2DAsync (torch binds no 2D copy), or None where it cannot load."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuMemcpy2DAsync_v2
    except (OSError, AttributeError) as exc:
        logger.info("no driver 2D memcpy (%s): strided exchange copies run as kernels", exc)
        return None
    fn.argtypes = [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def _rows_of(t: torch.Tensor) -> tuple[int, int] | None:
    """(pitch, width) in bytes of a matrix whose rows are contiguous, else None."""
    if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] > 1):
        return None
    width = t.shape[1] * t.element_size()
    pitch = t.stride(0) * t.element_size() if t.shape[0] > 1 else width
    return (pitch, width) if width <= pitch < _MAX_PITCH else None


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for [R, C] matrices of one dtype on CUDA; where both have contiguous
    rows (strided or not) it is one 2D memcpy. Into a peer's memory that runs on a copy engine
    and takes no SM; a device-local one (measured on H100) waits for free SMs like a kernel.
    Else (other layouts, no driver library, CUDA-graph capture) it is dst.copy_(src)."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"copy_rows needs matching matrices; got dst {tuple(dst.shape)} "
                         f"{dst.dtype}, src {tuple(src.shape)} {src.dtype}")
    fn = _memcpy_2d_async() if dst.is_cuda and src.is_cuda else None
    rows_dst, rows_src = _rows_of(dst), _rows_of(src)
    if (fn is None or rows_dst is None or rows_src is None
            or dst.is_contiguous() and src.is_contiguous()):
        dst.copy_(src)  # contiguous pairs: torch's own memcpy
        return
    if dst.numel() == 0:
        return
    with torch.cuda.device(dst.device):  # the driver call runs in the current context
        if torch.cuda.is_current_stream_capturing():
            dst.copy_(src)
            return
        spec = _Memcpy2D(srcMemoryType=_MEMORYTYPE_DEVICE, srcDevice=src.data_ptr(),
                         srcPitch=rows_src[0], dstMemoryType=_MEMORYTYPE_DEVICE,
                         dstDevice=dst.data_ptr(), dstPitch=rows_dst[0],
                         WidthInBytes=rows_dst[1], Height=dst.shape[0])
        stream = torch.cuda.current_stream().cuda_stream
        status = fn(ctypes.byref(spec), ctypes.c_void_p(stream))
    if status != 0:
        raise RuntimeError(f"cuMemcpy2DAsync failed with CUresult {status} copying "
                           f"{tuple(src.shape)} {src.dtype} rows (pitch {rows_src[0]} -> "
                           f"{rows_dst[0]} bytes)")


class SetupFailed(RuntimeError):
    """Another rank failed to set up the copy-engine buffers (this one did not)."""


_SETUP_ERRORS = (ImportError, RuntimeError, ValueError, AttributeError, TypeError)


def _log_unavailable(exc: Exception) -> None:
    logger.info("no copy-engine exchange for this SP group (%s: %s); NCCL carries it",
                type(exc).__name__, exc)


class EventWork:
    """A `work` whose wait() orders the current stream after an event (no CPU block)."""

    __slots__ = ("_device", "_event")

    def __init__(self, event: Any, device: torch.device) -> None:
        self._event, self._device = event, device

    def wait(self) -> None:
        torch.cuda.current_stream(self._device).wait_event(self._event)


class _Done:
    """The work of a device without streams: done once queued."""

    def wait(self) -> None:
        return None


def recorded(device: torch.device) -> EventWork | _Done:
    """An EventWork for everything queued so far on the current stream of `device` (on CPU,
    where work is done when queued, one that waits for nothing)."""
    if device.type != "cuda":
        return _Done()
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return EventWork(event, device)
