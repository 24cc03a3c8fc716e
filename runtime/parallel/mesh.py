"""The U x R device mesh of USP sequence parallelism (Ulysses inside, ring across).

Shapes: W = U x R ranks; global SP rank g = r * U + u (r ring rank, u Ulysses rank), so the
U ranks of a Ulysses group are neighbours (one node's NVLink under torchrun) and the ring
links Ulysses groups (across nodes where W exceeds a node).

    init_sequence_parallel(ulysses=2, ring=4)    # 8 ranks: mesh [[0, 1], [2, 3], ..., [6, 7]]
    init_sequence_parallel(plan="auto", num_heads=40, seq_len=75600)   # attnrt.parallel.plan

The SequenceParallel this returns is the Ulysses group (size U, what seq_to_heads exchanges
over) with `usp` set: the ring, the whole mesh's group for shape checks, and the plan's reason.
With R = 1 it is plain Ulysses over the U ranks, exactly as init_sequence_parallel(size=U).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from attnrt.parallel import groups as sp_mod
from attnrt.parallel.groups import SequenceParallel, SequenceParallelError
from attnrt.parallel.ring import Ring
from attnrt.parallel.zigzag import check_layout

logger = logging.getLogger("attnrt")


@dataclass(frozen=True)
class UspGroups:
    """What a USP layer needs beyond its Ulysses group: the ring of its heads, the whole mesh
    (a SequenceParallel over all W ranks that carries the shape check) and why this shape."""

    mesh: Any
    ring: Ring
    world: SequenceParallel
    ulysses: int
    reason: str = ""


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SequenceParallelError(f"{name}={value!r} is not allowed; allowed: a positive int")
    return value


def resolve_shape(ulysses: int | None, ring: int | None, plan: Any, world: int,
                  hints: dict[str, Any]) -> tuple[int, int, str]:
    """(U, R, reason) from what init_sequence_parallel was given; U x R must be the world."""
    if plan is not None:
        if ulysses is not None or ring is not None:
            raise SequenceParallelError("plan= and ulysses=/ring= were both given; pass one")
        from attnrt.parallel.plan import SpPlan, plan_sp

        if plan == "auto":
            plan = plan_sp(world, **hints)
        if not isinstance(plan, SpPlan):
            raise SequenceParallelError(f"plan={plan!r} is not allowed; allowed: 'auto' or "
                                        "the SpPlan that attnrt.parallel.plan.plan_sp returns")
        ulysses, ring, reason = plan.ulysses, plan.ring, plan.reason
    else:
        reason = "asked for"
    if ulysses is None and ring is None:
        ulysses = world
    if ulysses is None:
        ulysses = world // _positive("ring", ring) if world % ring == 0 else 0  # type: ignore[operator]
    if ring is None:
        ring = world // _positive("ulysses", ulysses) if world % ulysses == 0 else 0
    _positive("ulysses", ulysses)
    _positive("ring", ring)
    if ulysses * ring != world:
        raise SequenceParallelError(f"ulysses={ulysses} x ring={ring} = {ulysses * ring} is not "
                                    f"the world size {world}; allowed: U x R = {world}")
    return ulysses, ring, reason


def init_usp(group: Any, size: int | None, shape: tuple[Any, Any, Any, str],
             hints: dict[str, Any], **options: Any) -> SequenceParallel:
    """Build the mesh and set the SP group; every rank calls it alike (init_sequence_parallel
    forwards here when given ulysses=, ring=, plan= or plan hints).

    shape: (ulysses, ring, plan, ring_layout). ulysses, ring: U x R = world size (either alone:
    the other divides the world; neither: Ulysses over all ranks); with R > 1 the local
    attention of DistributedAttention becomes ring attention (attnrt.parallel.ring) over
    sequence blocks laid out as `ring_layout` says ("contiguous" or "zigzag", the load-balanced
    causal layout: attnrt.parallel.zigzag). plan="auto" (or a plan_sp result) picks U x R
    (attnrt.parallel.plan) from the hints num_heads, num_kv_heads, seq_len, gpus_per_node.
    """
    ulysses, ring, plan, ring_layout = shape
    if group is not None or size is not None:
        raise SequenceParallelError("group=/size= and ulysses=/ring=/plan= were both given; "
                                    "pass one way of shaping the group")
    if hints and plan is None:
        raise TypeError(f"init_sequence_parallel got {sorted(hints)}; these hints are "
                        "allowed only with plan=")
    check_layout(ring_layout, 1)
    if not sp_mod._init_from_launcher():
        raise SequenceParallelError("init_sequence_parallel(ulysses=, ring=, plan=) needs "
                                    "torch.distributed: call dist.init_process_group first, or "
                                    "start the ranks with torchrun")
    world = dist.get_world_size()
    u, r, reason = resolve_shape(ulysses, ring, plan, world, hints)
    if r == 1:  # plain Ulysses: today's path, group for group
        sp = sp_mod.init_sequence_parallel(size=u, **options)
        logger.info("sequence parallel: ulysses %d x ring 1 (%s)", u, reason)
        return sp
    mesh = _device_mesh(r, u)
    ulysses_group, ring_group = mesh.get_group("ulysses"), mesh.get_group("ring")
    base = sp_mod.init_sequence_parallel(group=ulysses_group, copy_engine=False, **options)
    world_group = dist.group.WORLD
    backend = sp_mod._backend_of(world_group)
    world_view = SequenceParallel(world_group, world, dist.get_rank(), backend,
                                  sp_mod._meta_group(world_group, backend),
                                  check_shards=base.check_shards)
    ring_meta = sp_mod._meta_group(ring_group, backend)
    ring_obj = Ring(ring_group, r, dist.get_rank(ring_group), ring_layout, ring_meta)
    usp = UspGroups(mesh, ring_obj, world_view, u, reason)
    sp = sp_mod.set_sequence_parallel(SequenceParallel(
        base.group, base.size, base.rank, base.backend, base.meta_group, base.overlap_chunks,
        base.all_to_all, base.check_shards, False, None, usp=usp))
    logger.info("sequence parallel: ulysses %d x ring %d, layout %s, rank %d (%s)", u, r,
                ring_layout, dist.get_rank(), reason)
    return sp


def _device_mesh(ring: int, ulysses: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    backend = sp_mod._backend_of(dist.group.WORLD)
    device = "cpu" if "gloo" in backend else ("npu" if "hccl" in backend else "cuda")
    return init_device_mesh(device, (ring, ulysses), mesh_dim_names=("ring", "ulysses"))


__all__ = ["UspGroups", "init_usp", "resolve_shape"]
