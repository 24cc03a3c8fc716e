"""The sequence-parallel (SP) group and the Ulysses all-to-all, on torch.distributed only.

Shapes: B batch, S = N/P tokens of this rank's sequence shard, N the (padded) full sequence,
P the SP size, H heads, Hp = H/P heads per rank, D head size.

    init_sequence_parallel(size=2)      # every rank, after dist.init_process_group (torchrun)
    seq_to_heads(x)                     # [B, S, H, D] on each rank -> [B, N, Hp, D]
    heads_to_seq(y)                     # [B, N, Hp, D] -> [B, S, H, D]; the inverse

The engine is whatever the group runs: NCCL on NVIDIA, HCCL on Ascend (torch_npu), gloo on CPU.
Exchanges use `all_to_all_single` on one contiguous buffer per tensor. `all_to_all="pairwise"`
builds the same exchange from batched isend/irecv, for process groups that lack
all_to_all_single (older gloo builds, some vendor stacks); gloo in torch 2.13 has it for CPU
tensors, and both paths are tested there.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from attnrt.errors import AttnrtError
from attnrt.selection import packs
from attnrt.selection.packs import Platform

logger = logging.getLogger("attnrt")
ALL_TO_ALL_MODES = ("auto", "single", "pairwise")


class SequenceParallelError(AttnrtError, RuntimeError):
    """The SP group is missing or cannot be built as asked."""


class ShardError(AttnrtError, ValueError):
    """Sharded inputs that sequence parallelism cannot serve (heads not divisible by P, ...)."""


class ShardMismatchError(ShardError):
    """Ranks of one SP group passed different shapes; every rank raises the same error."""


@dataclass(frozen=True)
class SequenceParallel:
    """The SP group a DistributedAttention layer exchanges over.

    `meta_group` runs the small shape check: a gloo twin of a device group, so the check moves
    CPU integers and never synchronises the GPU. `overlap_chunks` None lets the layer choose.
    """

    group: Any
    size: int
    rank: int
    backend: str
    meta_group: Any = None
    overlap_chunks: int | None = None
    all_to_all: str = "single"
    check_shards: bool | str = True
    local_first: bool | None = None
    peer_copies: Any = None  # a PeerCopies where the exchange runs on copy engines
    usp: Any = None  # attnrt.parallel.mesh.UspGroups where a ring runs beside Ulysses (R > 1)
    # check_shards="new_shapes": what each shape signature checked so far agreed on.
    checked: dict[tuple[int, ...], dict[str, int]] = field(
        default_factory=dict, init=False, compare=False, repr=False)

    @property
    def meta_on_cpu(self) -> bool:
        return self.size == 1 or "gloo" in _backend_of(self.meta_group)


SINGLE = SequenceParallel(group=None, size=1, rank=0, backend="none")
_state: SequenceParallel | None = None


def _backend_of(group: Any) -> str:
    return str(dist.get_backend(group)).lower() if group is not None else "none"


def init_sequence_parallel(group: Any = None, size: int | None = None, *,
                           overlap_chunks: int | None = None, all_to_all: str = "auto",
                           check_shards: bool | str = True, local_first: bool | None = None,
                           priority_exchange: bool = True, copy_engine: bool | None = None,
                           ulysses: int | None = None, ring: int | None = None, plan: Any = None,
                           ring_layout: str = "contiguous", **plan_hints: Any) -> SequenceParallel:
    """Set the SP group for every DistributedAttention layer of this process; call on every rank.

    group: an existing process group (its ranks, in rank order, hold consecutive shards);
    size: split the world into groups of `size` consecutive ranks (under torchrun, size <=
    GPUs per node keeps each group inside one node's NVLink); neither: the whole world.
    overlap_chunks: heads are exchanged in this many chunks, chunk i+1 travelling while chunk i
    is attended (1: no overlap; None: the layer's default, see attnrt.parallel.layers).
    all_to_all: "single" (all_to_all_single; what "auto" picks on every backend known today) or
    "pairwise" (batched isend/irecv, for groups without all_to_all_single).
    check_shards: gather every rank's shapes once per forward so a mismatch raises everywhere
    instead of hanging (a gloo round trip between the ranks' CPUs, 0.1-0.6 ms of host time per
    forward, bench/NOTES-distributed.md); "new_shapes": only on the first forward with each new
    set of shapes on this rank, which catches ranks sharded differently from the start, but not
    a rank whose shapes later change alone (the ranks then wait in the exchange for each other,
    or, on copy engines, attend mismatched data); False: never.
    local_first: attend this rank's own shard (the heads it keeps) while the other shards are
    in flight, then merge by log-sum-exp (see attnrt.parallel.local_first); None: on for device
    groups without overlap_chunks, where the layer's inputs allow it; True: wherever they allow it.
    priority_exchange: for NCCL groups, run the exchanges on a twin communicator with a
    high-priority stream, so its kernels get SMs ahead of attention blocks already queued
    (without it an exchange started beside a long attention kernel waits for that kernel);
    costs one more communicator. False exchanges over the group as given.
    copy_engine: for a 2-rank NCCL group on one host whose GPUs map each other's memory (torch
    symmetric memory), the local-first exchange runs as peer-to-peer copies on the GPUs' copy
    engines, which take no SM from the attention beside them (attnrt.parallel.peer_copies); None:
    wherever that works (not with local_first=False), NCCL elsewhere; True: raise
    SequenceParallelError where it does not; False: always NCCL.
    Without torch.distributed (and no torchrun environment), group=None and size 1 give a
    one-process group that runs no collective.
    ulysses, ring, plan, ring_layout, plan_hints: USP on a U x R mesh (attnrt.parallel.mesh).
    """
    global _state
    if ulysses is not None or ring is not None or plan is not None or plan_hints:
        from attnrt.parallel.mesh import init_usp

        return init_usp(group, size, (ulysses, ring, plan, ring_layout), plan_hints,
                        overlap_chunks=overlap_chunks, all_to_all=all_to_all,
                        check_shards=check_shards, priority_exchange=priority_exchange)
    _check_arguments(overlap_chunks, all_to_all, check_shards, local_first, copy_engine)
    if not _init_from_launcher():
        return set_sequence_parallel(_one_process(group, size, copy_engine, overlap_chunks,
                                                  check_shards, local_first))
    group = _data_group(group, size)
    backend = _backend_of(group)
    mode = all_to_all if all_to_all != "auto" else "single"
    meta = _meta_group(group, backend)
    copies = _peer_copies(group, backend, meta, copy_engine, local_first)
    if priority_exchange:
        group = _priority_twin(group, backend)
    _state = SequenceParallel(group, dist.get_world_size(group), dist.get_rank(group), backend,
                              meta, overlap_chunks, mode, check_shards, local_first, copies)
    logger.info("sequence parallel: size %d, rank %d, backend %s, all_to_all %s, copy engines "
                "%s", _state.size, _state.rank, backend, mode, copies is not None)
    return _state


def _one_process(group: Any, size: int | None, copy_engine: bool | None,
                 overlap_chunks: int | None, check_shards: bool | str,
                 local_first: bool | None) -> SequenceParallel:
    """The SP group of a process without torch.distributed: only one rank, no collective."""
    if group is None and size in (None, 1):
        if copy_engine:
            raise SequenceParallelError("copy_engine=True needs a 2-rank NCCL group; this "
                                        "process has no torch.distributed group")
        return replace(SINGLE, overlap_chunks=overlap_chunks, check_shards=check_shards,
                       local_first=local_first)
    raise SequenceParallelError(
        f"init_sequence_parallel(group={group!r}, size={size!r}) needs torch.distributed: "
        "call dist.init_process_group first, or start the ranks with torchrun")


def _check_arguments(overlap_chunks: Any, all_to_all: Any, check_shards: Any, local_first: Any,
                     copy_engine: Any) -> None:
    """init_sequence_parallel's arguments, checked before any collective runs."""
    if all_to_all not in ALL_TO_ALL_MODES:
        raise ValueError(f"all_to_all={all_to_all!r} is not allowed; allowed: "
                         f"{', '.join(ALL_TO_ALL_MODES)}")
    if overlap_chunks is not None and (isinstance(overlap_chunks, bool) or not isinstance(
            overlap_chunks, int) or overlap_chunks < 1):
        raise ValueError(f"overlap_chunks={overlap_chunks!r} must be None or a positive integer")
    for name, value in (("local_first", local_first), ("copy_engine", copy_engine)):
        if value not in (None, True, False):
            raise ValueError(f"{name}={value!r} is not allowed; allowed: None, True, False")
    if not (isinstance(check_shards, bool) or check_shards == "new_shapes"):
        raise ValueError(f"check_shards={check_shards!r} is not allowed; allowed: True, False, "
                         "'new_shapes'")


_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _init_from_launcher() -> bool:
    """Whether torch.distributed is ready; under torchrun, initialise it if nobody has.

    torchrun sets the rendezvous environment but does not call init_process_group; doing it here
    (backends chosen by torch for the devices present, one GPU per rank by LOCAL_RANK) makes
    `init_sequence_parallel(size=...)` alone enough on one node or many.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not all(key in os.environ for key in _LAUNCHER_ENV):
        return False
    platform = _probed_platform()
    if platform is not None and platform.indexed:  # one device per rank, by LOCAL_RANK
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        getattr(torch, platform.torch_device_types[0]).set_device(local_rank)
    dist.init_process_group(backend=platform.dist_backend if platform is not None else None)
    logger.info("torch.distributed initialised from the launcher's environment: rank %d of %d, "
                "backend %s", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def _probed_platform() -> Platform | None:
    """The probed device's platform facts (its dist_backend: nccl, hccl, gloo, or None to let
    torch pick); None for a simulated device, which has no stack to initialise."""
    from attnrt.selection.device import probe

    device = probe()
    return None if device.simulated else packs.get(device.platform)


def _data_group(group: Any, size: int | None) -> Any:
    world = dist.get_world_size()
    if group is not None:
        if size is not None and size != dist.get_world_size(group):
            raise SequenceParallelError(f"size={size} does not match the given group's size "
                                        f"{dist.get_world_size(group)}; pass one of them")
        if dist.get_rank(group) < 0:
            raise SequenceParallelError("this rank is not a member of the given group; each rank "
                                        "must pass the SP group it belongs to")
        return group
    if size is None or size == world:
        return dist.group.WORLD
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or world % size:
        raise SequenceParallelError(f"size={size!r} must be a positive integer dividing the world "
                                    f"size {world}")
    mine, _ = dist.new_subgroups(group_size=size)
    return mine


def _meta_group(group: Any, backend: str) -> Any:
    if "gloo" in backend:
        return group
    ranks = dist.get_process_group_ranks(group)
    try:  # only this group's members take part, so subgroups can be built independently
        return dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
    except (RuntimeError, ValueError) as exc:
        logger.warning("no gloo twin for the %s SP group (%s): shape checks run on the device, "
                       "which synchronises it once per forward", backend, exc)
        return group


def _peer_copies(group: Any, backend: str, meta: Any, wanted: bool | None,
                 local_first: bool | None) -> Any:
    """A PeerCopies for every rank of a 2-rank NCCL group on one host, or None on every rank."""
    size = dist.get_world_size(group)
    if wanted is False:
        return None
    if local_first is False:  # the copy engines carry local-first's exchange only
        if wanted:
            raise SequenceParallelError("copy_engine=True carries the local-first exchange, "
                                        "which local_first=False turns off")
        return None
    if size != 2 or "nccl" not in backend:
        if wanted:
            raise SequenceParallelError(f"copy_engine=True needs a 2-rank NCCL group; this one "
                                        f"has {size} ranks on {backend}")
        return None
    hosts: list[Any] = [None] * size
    dist.all_gather_object(hosts, socket.gethostname(), group=meta)
    if len(set(hosts)) > 1:
        if wanted:
            raise SequenceParallelError(f"copy_engine=True needs both ranks on one host; they "
                                        f"run on {hosts}")
        return None
    from attnrt.parallel.peer_copies import PeerCopies

    on = torch.device("cpu") if "gloo" in _backend_of(meta) else torch.device("cuda")

    def agree(ok: bool) -> bool:
        flag = torch.tensor([int(ok)], device=on)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=meta)
        return bool(flag.item())

    copies = PeerCopies.build(group, torch.device("cuda", torch.cuda.current_device()), agree)
    if copies is None and wanted:
        raise SequenceParallelError("copy_engine=True, but these GPUs cannot map each other's "
                                    "memory through torch symmetric memory (see the INFO log)")
    return copies


_TWINS: dict[Any, Any] = {}


def _priority_twin(group: Any, backend: str) -> Any:
    """An NCCL twin of `group` whose collectives run on a high-priority stream; else `group`.

    Built once per group (every member calls init_sequence_parallel alike, so all of them hit
    or miss this cache together)."""
    options_cls = getattr(getattr(dist, "ProcessGroupNCCL", None), "Options", None)
    if "nccl" not in backend or options_cls is None:
        return group
    if group in _TWINS:
        return _TWINS[group]
    options = options_cls()
    options.is_high_priority_stream = True
    try:
        twin = dist.new_group(dist.get_process_group_ranks(group), backend="nccl",
                              pg_options=options, use_local_synchronization=True)
        _TWINS[group] = twin
        return twin
    except (RuntimeError, ValueError) as exc:
        logger.warning("no high-priority NCCL twin for the SP group (%s): exchanges use the "
                       "group's own stream and may wait behind attention kernels", exc)
        return group


def set_sequence_parallel(sp: SequenceParallel) -> SequenceParallel:
    """Make an SP group that init_sequence_parallel returned earlier the current one again
    (e.g. to switch between schedules built once); returns it."""
    global _state
    if not isinstance(sp, SequenceParallel):
        raise TypeError(f"sp={type(sp).__name__} is not allowed; expected the SequenceParallel "
                        "that init_sequence_parallel returned")
    _state = sp
    return sp


def clear_sequence_parallel() -> None:
    """Forget the SP group and its high-priority twins (the process groups themselves stay;
    destroying them is the caller's)."""
    global _state
    _state = None
    _TWINS.clear()


def get_sequence_parallel() -> SequenceParallel:
    """The SP group set by init_sequence_parallel; SINGLE in a process without torch.distributed.

    A multi-process world without an SP group is an error rather than size 1: each rank would
    silently attend over its own shard only.
    """
    if _state is not None:
        return _state
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise SequenceParallelError(
            f"no sequence-parallel group in a world of {dist.get_world_size()} processes: call "
            "attnrt.parallel.groups.init_sequence_parallel(size=...) on every rank first")
    return SINGLE


# ---------------------------------------------------------------- raw exchanges


class Pending:
    """An exchange in flight: `wait()` blocks (or orders the device stream), returns the result."""

    __slots__ = ("_finish", "_keep", "_works")

    def __init__(self, works: list[Any], finish: Callable[[], torch.Tensor],
                 keep: tuple[torch.Tensor, ...] = ()) -> None:
        # `keep` holds the send buffer until the exchange is done, whatever the backend stashes.
        self._works, self._finish, self._keep = works, finish, keep

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        self._works, self._keep = [], ()
        return self._finish()


def exchange(send: torch.Tensor, recv: torch.Tensor, sp: SequenceParallel) -> list[Any]:
    """Start the all-to-all of send [P, ...] into recv [P, ...] (row p goes to / comes from p)."""
    if sp.size == 1:
        recv.copy_(send)
        return []
    if sp.all_to_all == "single":
        return [dist.all_to_all_single(recv, send, group=sp.group, async_op=True)]
    ops = []
    for peer in range(sp.size):
        if peer == sp.rank:
            recv[peer].copy_(send[peer])
            continue
        global_peer = dist.get_global_rank(sp.group, peer)
        ops.append(dist.P2POp(dist.isend, send[peer], global_peer, sp.group))
        ops.append(dist.P2POp(dist.irecv, recv[peer], global_peer, sp.group))
    return dist.batch_isend_irecv(ops) if ops else []


def start_seq_to_heads(x: torch.Tensor, sp: SequenceParallel, chunk: int = 0,
                       chunks: int = 1) -> Pending:
    """x [B, S, Hx, D] -> (on wait) [B, P*S, Hx/(P*chunks), D]: heads chunk `chunk` of each rank.

    Rank p receives heads p*Hx/P + chunk*Hc ... + Hc, with Hc = Hx/(P*chunks).
    """
    b, s, hx, d = x.shape
    p, hc = sp.size, hx // (sp.size * chunks)
    parts = x.view(b, s, p, chunks, hc, d)[:, :, :, chunk]  # [B, S, P, Hc, D]
    send = parts.permute(2, 0, 1, 3, 4).contiguous()  # [P, B, S, Hc, D]: one copy, one buffer
    recv = torch.empty_like(send)
    works = exchange(send, recv, sp)
    return Pending(works, lambda: recv.transpose(0, 1).reshape(b, p * s, hc, d), (send,))


def start_heads_to_seq(y: torch.Tensor, sp: SequenceParallel, out: torch.Tensor,
                       chunk: int = 0, chunks: int = 1) -> Pending:
    """y [B, P*S, Hc, D] (heads chunk `chunk` of this rank) -> written into out [B, S, H, D]."""
    b, n, hc, d = y.shape
    p = sp.size
    send = y.view(b, p, n // p, hc, d).transpose(0, 1).contiguous()  # a view when B == 1
    recv = torch.empty_like(send)  # [P, B, S, Hc, D]: source rank p sent its heads p*Hp + ...
    works = exchange(send, recv, sp)

    def finish() -> torch.Tensor:
        target = out.view(b, n // p, p, chunks, hc, d)[:, :, :, chunk]
        target.copy_(recv.permute(1, 2, 0, 3, 4))
        return out

    return Pending(works, finish, (send,))


def gather_heads_raw(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """x [B, R, Hp, D] on each rank -> [B, R, P*Hp, D], rank p's heads at p*Hp."""
    b, r, hp, d = x.shape
    buf = torch.empty(sp.size * x.numel(), dtype=x.dtype, device=x.device)
    _all_gather(buf, x.contiguous().view(-1), sp.group)
    return buf.view(sp.size, *x.shape).permute(1, 2, 0, 3, 4).reshape(b, r, sp.size * hp, d)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    # Flat buffers: gloo's allgather checks out's shape against P copies of a 1-D input.
    # torch 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


# ---------------------------------------------------------------- differentiable exchanges


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        return start_seq_to_heads(x.contiguous(), sp).wait()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return heads_to_seq(grad.contiguous(), ctx.sp), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        b, n, hp, d = y.shape
        out = y.new_empty(b, n // sp.size, hp * sp.size, d)
        return start_heads_to_seq(y.contiguous(), sp, out).wait()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return seq_to_heads(grad.contiguous(), ctx.sp), None


class _GatherHeads(torch.autograd.Function):
    """Forward: all-gather over heads. Backward: keep this rank's heads of the gradient.

    The gathered output is the same on every rank, and so is what each rank computes from it;
    each rank's slice of that gradient is therefore already the whole gradient for its heads.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp, ctx.hp = sp, x.shape[2]
        return gather_heads_raw(x, sp)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        start = ctx.sp.rank * ctx.hp
        return grad[:, :, start:start + ctx.hp].contiguous(), None


def seq_to_heads(x: torch.Tensor, sp: SequenceParallel | None = None) -> torch.Tensor:
    """[B, S, H, D] on each rank -> [B, P*S, H/P, D] (differentiable)."""
    sp = sp or get_sequence_parallel()
    return x if sp.size == 1 else _SeqToHeads.apply(x, sp)


def heads_to_seq(y: torch.Tensor, sp: SequenceParallel | None = None) -> torch.Tensor:
    """[B, P*S, H/P, D] on each rank -> [B, S, H, D] (differentiable); inverse of seq_to_heads."""
    sp = sp or get_sequence_parallel()
    return y if sp.size == 1 else _HeadsToSeq.apply(y, sp)


def gather_heads(x: torch.Tensor, sp: SequenceParallel | None = None) -> torch.Tensor:
    """[B, R, H/P, D] on each rank -> [B, R, H, D] on every rank (differentiable)."""
    sp = sp or get_sequence_parallel()
    return x if sp.size == 1 else _GatherHeads.apply(x, sp)


__all__ = [
    "SINGLE", "SequenceParallel", "SequenceParallelError", "ShardError", "ShardMismatchError",
    "clear_sequence_parallel", "gather_heads", "get_sequence_parallel", "heads_to_seq",
    "init_sequence_parallel", "seq_to_heads",
    "set_sequence_parallel",
]
