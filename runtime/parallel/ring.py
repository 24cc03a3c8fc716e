"""Ring attention over a process group: K/V blocks travel, partial results merge by lse.

Shapes: B batch, R ring size, S the tokens of this ring rank's block, Nq = S + T query rows
(T replicated tokens), H heads, Hkv kv heads (GQA: H % Hkv == 0), D head size.

One forward on every ring rank (rank r; the block of ring rank j is "block j"):

    step t = 0 .. R-1     hold block src = (r - t) mod R; send it to rank r+1 and receive block
                          src-1 from rank r-1 (isend/irecv) while attending the block in hand
    pieces                this rank's query runs against block src's key runs: full pieces, the
                          causal diagonal, nothing (layouts in attnrt.parallel.zigzag)
    merge                 each piece's (out, lse) into an fp32 accumulator by log-sum-exp

The backward walks the same ring: K/V rotate again, each rank adds its dK/dV for the block in
hand into an fp32 accumulator that travels on with the block (sent while the next block is
attended) and, after R steps, arrives back at the block's owner. Pieces go through the
`attend(q, k, v, causal) -> (out, lse [B, H, n] float32)` given (a backend's
forward_with_lse); their gradients come from the final lse and output (flash attention's
backward, exact for a piece): TRITON_FLASH_ATTN's backward kernels where it serves the device,
the same formula in fp32 torch elsewhere (attnrt.parallel.ring_grads), summed in fp32. K/V
travel with Hkv heads: GQA is never expanded.

Replicated tokens (text) are held whole by every ring rank: their keys are one more piece,
attended locally (not rotated); their queries ride along every ring step, so every ring rank
returns the whole replicated output. Its gradient is split: each ring rank back-propagates 1/R
of it, so the gradients of the replicated inputs on the ring ranks sum to the whole (the same
share-per-rank convention as Ulysses' heads).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from attnrt.errors import AttnrtError
from attnrt.parallel.groups import Pending, SequenceParallelError
from attnrt.parallel.ring_grads import PieceBackward, choose_piece_backward, torch_backward
from attnrt.parallel.ring_math import acc_dtype, merge_into, reference_attend
from attnrt.parallel.zigzag import check_layout, ring_runs

Run = tuple[int, int, int]  # (local row offset, global position, length)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool],
                  tuple[torch.Tensor, torch.Tensor]]


class RingError(AttnrtError, RuntimeError):
    """Ring attention cannot run as asked (a backend without lse, an inconsistent plan)."""


@dataclass(frozen=True)
class Ring:
    """The ring ranks of one sequence: `group` holds them in ring order (rank r sends to r+1).

    layout: how the sequence is spread over them (attnrt.parallel.zigzag). `meta_group` runs
    shape checks on the host (a gloo twin of a device group); None: the group itself.
    """

    group: Any
    size: int
    rank: int
    layout: str = "contiguous"
    meta_group: Any = None

    @classmethod
    def over(cls, group: Any = None, layout: str = "contiguous") -> Ring:
        """The ring over `group` (None: the whole world) for this rank."""
        check_layout(layout, 1)
        if not (dist.is_available() and dist.is_initialized()):
            raise SequenceParallelError("Ring.over needs torch.distributed: call "
                                        "dist.init_process_group first")
        group = group or dist.group.WORLD
        return cls(group, dist.get_world_size(group), dist.get_rank(group), layout)

    def global_rank(self, ring_rank: int) -> int:
        return dist.get_global_rank(self.group, ring_rank % self.size)


@dataclass(frozen=True)
class Piece:
    """Query rows `q` attend key rows `k`: all of them, or causally (equal lengths, in order)."""

    q: slice
    k: slice
    causal: bool


@dataclass(frozen=True)
class RingSpec:
    """What one ring call attends: rows taking part, per source block, and how.

    q_runs: this rank's query rows (block rows, then replicated rows); k_runs[j]: the rows of
    block j that are keys (padding trimmed); extra_runs: replicated key rows. Rows outside every
    run get output 0 and lse -inf.
    """

    ring: Ring
    q_runs: tuple[Run, ...]
    k_runs: tuple[tuple[Run, ...], ...]
    extra_runs: tuple[Run, ...]
    causal: bool
    scale: float
    attend: Attend
    replicated_rows: slice = field(default_factory=lambda: slice(0, 0))  # grads: 1/R each
    backward: PieceBackward | None = None  # each piece's gradients; None: the torch formula


def block_runs(layout: str, ring: int, ring_rank: int, block: int, valid: int,
               offset: int = 0) -> tuple[Run, ...]:
    """The runs of ring rank `ring_rank`'s block of `block` rows with position < valid."""
    runs, local = [], offset
    for start, length in ring_runs(layout, ring, ring_rank, block):
        keep = max(0, min(length, valid - start))
        if keep:
            runs.append((local, start, keep))
        local += length
    return tuple(runs)


def _in_order(runs: list[Run]) -> bool:
    """Locally contiguous and in position order: local order is causal order."""
    return all(a[0] + a[2] == b[0] and a[1] + a[2] <= b[1]
               for a, b in zip(runs, runs[1:], strict=False))


def plan_pieces(q_runs: tuple[Run, ...], k_runs: tuple[Run, ...], causal: bool) -> list[Piece]:
    """The attention calls for query runs against key runs, adjacent full pieces joined.

    Causal: a key run wholly before a query run is a full piece, one wholly after is nothing,
    the same run is a causal diagonal; where the key runs open the query runs in causal order
    (a rank's own block), they are one causal piece.
    """
    pieces: list[Piece] = []
    rest = list(q_runs)
    if causal and k_runs and rest[:len(k_runs)] == list(k_runs) and _in_order(list(k_runs)):
        start, end = k_runs[0][0], k_runs[-1][0] + k_runs[-1][2]
        pieces.append(Piece(slice(start, end), slice(start, end), True))
        rest = rest[len(k_runs):]
    for qo, qs, ql in rest:
        for ko, ks, kl in k_runs:
            q, k = slice(qo, qo + ql), slice(ko, ko + kl)
            if not causal or ks + kl - 1 <= qs:
                pieces.append(Piece(q, k, False))
            elif (ks, kl) == (qs, ql):
                pieces.append(Piece(q, k, True))
            elif ks <= qs + ql - 1:
                raise RingError(f"key run at {ks}+{kl} overlaps query run at {qs}+{ql} "
                                "partially; the layouts never produce this")
    return _joined(_joined(pieces, by_k=True), by_k=False)


def piece_queries(spec: RingSpec) -> set[tuple[bool, int]]:
    """(causal, query rows) of every piece one ring call attends on this rank, over all steps
    and the replicated keys: the lengths its `attend` will see."""
    return {(p.causal, p.q.stop - p.q.start)
            for k_runs in (spec.extra_runs, *spec.k_runs)
            for p in plan_pieces(spec.q_runs, k_runs, spec.causal)}


def _joined(pieces: list[Piece], by_k: bool) -> list[Piece]:
    """Join full pieces that share their key (by_k) or query rows and are adjacent in the other."""
    def key(p: Piece) -> tuple[int, ...]:
        same, other = (p.k, p.q) if by_k else (p.q, p.k)
        return (p.causal, same.start, same.stop, other.start)

    out: list[Piece] = []
    for p in sorted(pieces, key=key):
        last = out[-1] if out else None
        if last is not None and not p.causal and not last.causal:
            if by_k and last.k == p.k and last.q.stop == p.q.start:
                out[-1] = Piece(slice(last.q.start, p.q.stop), p.k, False)
                continue
            if not by_k and last.q == p.q and last.k.stop == p.k.start:
                out[-1] = Piece(p.q, slice(last.k.start, p.k.stop), False)
                continue
        out.append(p)
    return out


# ---------------------------------------------------------------- K/V memory accounting


class KvMemory:
    """Bytes of K/V blocks (and their gradient accumulators) the ring holds on this rank:
    `live` now, `peak` since reset(); each buffer counts until it is freed."""

    def __init__(self) -> None:
        self.live = {"kv": 0, "dkv": 0}
        self.peak = {"kv": 0, "dkv": 0}

    def reset(self) -> None:
        self.peak = dict(self.live)

    def track(self, kind: str, *tensors: torch.Tensor) -> None:
        for t in tensors:
            size = t.numel() * t.element_size()
            self.live[kind] += size
            self.peak[kind] = max(self.peak[kind], self.live[kind])
            weakref.finalize(t, self._free, kind, size)

    def _free(self, kind: str, size: int) -> None:
        self.live[kind] -= size


KV_MEMORY = KvMemory()


# ---------------------------------------------------------------- transport


class GroupTransport:
    """Sends tensors to ring rank r+1 and receives their likes from r-1 (batched isend/irecv)."""

    TAGS = {"kv": 17, "dkv": 18}

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.next = self.prev = -1
        if ring.size > 1:  # a ring of one sends nothing
            self.next, self.prev = ring.global_rank(ring.rank + 1), ring.global_rank(ring.rank - 1)

    def start(self, tensors: list[torch.Tensor], kind: str) -> Pending:
        recvs = [torch.empty_like(t) for t in tensors]
        KV_MEMORY.track(kind, *recvs)
        tag, group = self.TAGS[kind], self.ring.group
        sends = [t.contiguous() for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, group, tag) for t in sends]
        ops += [dist.P2POp(dist.irecv, r, self.prev, group, tag) for r in recvs]
        works = dist.batch_isend_irecv(ops)
        return Pending(works, lambda: recvs, tuple(sends))  # type: ignore[arg-type,return-value]


# ---------------------------------------------------------------- forward and backward


def ring_forward(q: torch.Tensor, kv: list[torch.Tensor], extra: list[torch.Tensor] | None,
                 spec: RingSpec, transport: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Nq, H, D], kv = [k, v] this rank's block [B, S, Hkv, D], extra = replicated [k, v]
    or None -> (out [B, Nq, H, D] q's dtype, lse [B, H, Nq] accumulation dtype)."""
    dt = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=dt, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=dt,
                     device=q.device)
    if extra is not None:
        _attend_pieces(q, extra, plan_pieces(spec.q_runs, spec.extra_runs, spec.causal), spec,
                       out, lse)
    ring = spec.ring
    KV_MEMORY.track("kv", *kv)
    current = kv
    for step in range(ring.size):
        src = (ring.rank - step) % ring.size
        incoming = transport.start(current, "kv") if step < ring.size - 1 else None
        pieces = plan_pieces(spec.q_runs, spec.k_runs[src], spec.causal)
        _attend_pieces(q, current, pieces, spec, out, lse)
        if incoming is not None:
            current = incoming.wait()
    return out.to(q.dtype), lse


def _attend_pieces(q: torch.Tensor, kv: list[torch.Tensor], pieces: list[Piece],
                   spec: RingSpec, out: torch.Tensor, lse: torch.Tensor) -> None:
    for p in pieces:
        part_out, part_lse = spec.attend(q[:, p.q], kv[0][:, p.k], kv[1][:, p.k], p.causal)
        merge_into(out, lse, p.q, part_out, part_lse)


class _Rows(NamedTuple):
    """Row terms of one ring backward, over all Nq query rows of this rank."""

    backward: PieceBackward
    dout: torch.Tensor  # in the dtype the backward reads (PieceBackward.wants_input_dtype)
    out: torch.Tensor
    lse: torch.Tensor
    delta: torch.Tensor
    dq: torch.Tensor  # accumulator


def ring_backward(dout: torch.Tensor, q: torch.Tensor, kv: list[torch.Tensor],
                  extra: list[torch.Tensor] | None, out: torch.Tensor, lse: torch.Tensor,
                  spec: RingSpec, transport: Any,
                  ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
    """Gradients of ring_forward: (dq, [dk, dv] of this rank's block, [dk, dv] of the
    replicated keys or None), in the inputs' dtypes. Each piece through spec.backward."""
    dt, ring = acc_dtype(q.dtype), spec.ring
    dout = dout.to(dt, copy=True)  # scaled below: never the caller's tensor
    if spec.replicated_rows.stop > spec.replicated_rows.start and ring.size > 1:
        dout[:, spec.replicated_rows] /= ring.size  # each ring rank takes 1/R (module doc)
    delta = (dout * out.to(dt)).sum(-1).transpose(1, 2)  # [B, H, Nq]
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    backward = spec.backward or torch_backward(spec.scale)
    rows = _Rows(backward, dout.to(q.dtype) if backward.wants_input_dtype else dout,
                 out.to(q.dtype), lse, delta, dq)
    dextra = None
    if extra is not None:
        dextra = [torch.zeros(t.shape, dtype=dt, device=t.device) for t in extra]
        _piece_grads(q, extra, plan_pieces(spec.q_runs, spec.extra_runs, spec.causal), spec,
                     rows, dextra)
    current, arriving, dkv = kv, None, None
    for step in range(ring.size):
        src = (ring.rank - step) % ring.size
        incoming = transport.start(current, "kv") if step < ring.size - 1 else None
        dkv = [torch.zeros(t.shape, dtype=dt, device=t.device) for t in current]
        KV_MEMORY.track("dkv", *dkv)
        _piece_grads(q, current, plan_pieces(spec.q_runs, spec.k_runs[src], spec.causal), spec,
                     rows, dkv)
        if arriving is not None:  # what the ranks before added for this block
            for mine, theirs in zip(dkv, arriving.wait(), strict=True):
                mine += theirs
        if ring.size > 1:  # travels on while the next block is attended; home after R steps
            arriving = transport.start(dkv, "dkv")
        if incoming is not None:
            current = incoming.wait()
    home = arriving.wait() if arriving is not None else dkv
    return (dq.to(q.dtype), [g.to(t.dtype) for g, t in zip(home, kv, strict=True)],  # type: ignore[arg-type]
            None if dextra is None else [g.to(t.dtype) for g, t in zip(dextra, extra,  # type: ignore[arg-type]
                                                                          strict=True)])


def _piece_grads(q: torch.Tensor, kv: list[torch.Tensor], pieces: list[Piece], spec: RingSpec,
                 rows: _Rows, dkv: list[torch.Tensor]) -> None:
    for p in pieces:
        dq_p, dk_p, dv_p = rows.backward.grads(
            q[:, p.q], kv[0][:, p.k], kv[1][:, p.k], rows.out[:, p.q], rows.dout[:, p.q],
            rows.lse[:, :, p.q], rows.delta[:, :, p.q], p.causal)
        rows.dq[:, p.q] += dq_p
        dkv[0][:, p.k] += dk_p
        dkv[1][:, p.k] += dv_p


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ek: torch.Tensor | None, ev: torch.Tensor | None, spec: RingSpec) -> torch.Tensor:
        extra = None if ek is None or ev is None else [ek, ev]
        transport = GroupTransport(spec.ring)
        out, lse = ring_forward(q, [k, v], extra, spec, transport)
        ctx.spec, ctx.has_extra = spec, extra is not None
        ctx.save_for_backward(q, k, v, ek, ev, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, ek, ev, out, lse = ctx.saved_tensors
        extra = [ek, ev] if ctx.has_extra else None
        dq, dkv, dextra = ring_backward(dout, q, [k, v], extra, out, lse, ctx.spec,
                                        GroupTransport(ctx.spec.ring))
        dek, dev = dextra if dextra is not None else (None, None)
        return dq, dkv[0], dkv[1], dek, dev, None


# ---------------------------------------------------------------- the public call


def ring_spec(ring: Ring, block: int, causal: bool, scale: float, attend: Attend,
              original_seq_len: int | None = None, replicated: int = 0,
              backward: PieceBackward | None = None) -> RingSpec:
    """The spec of one ring call: blocks of `block` rows in ring.layout, positions >=
    original_seq_len padding, `replicated` query and key rows after the sequence; each piece's
    gradients through `backward` (None: the torch formula, attnrt.parallel.ring_grads)."""
    full = block * ring.size
    valid = full if original_seq_len is None else original_seq_len
    rep_runs = ((block, valid, replicated),) if replicated else ()
    return RingSpec(
        ring, block_runs(ring.layout, ring.size, ring.rank, block, valid) + rep_runs,
        tuple(block_runs(ring.layout, ring.size, j, block, valid) for j in range(ring.size)),
        ((0, valid, replicated),) if replicated else (), causal, scale, attend,
        slice(block, block + replicated), backward)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring, *,
                   causal: bool = False, softmax_scale: float | None = None,
                   original_seq_len: int | None = None,
                   replicated: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   attend: Attend | None = None, check: bool = True,
                   piece_backward: str = "auto",
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over `ring`: this rank's block in, its output block out (differentiable).

    q [B, S, H, D], k, v [B, S, Hkv, D]: ring rank r's block of the sequence, laid out as
    ring.layout says (attnrt.parallel.zigzag); rows at positions >= original_seq_len are
    padding (no key, output 0). replicated: (q, k, v) [B, T, H|Hkv, D], the same on every ring
    rank, placed after the sequence; then returns (out, replicated out [B, T, H, D]).
    attend(q, k, v, causal) -> (out, lse [B, H, n] float32) runs each piece (default: attnrt's
    reference). check: gather every rank's shapes first, so a mismatch raises
    ShardMismatchError on every rank instead of hanging. piece_backward: "auto" (a kernel where
    TRITON_FLASH_ATTN serves the device, else the torch formula), "torch" or "triton"
    (attnrt.parallel.ring_grads). Call on every ring rank.

    Equivalent PyTorch: attention over the whole (unsharded) sequence, then each rank's rows.
    """
    from attnrt.parallel.ring_checks import check_ring_inputs

    check_ring_inputs(q, k, v, ring, replicated, original_seq_len, check)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    t = 0 if replicated is None else replicated[0].shape[1]
    backward = choose_piece_backward(piece_backward, q, k, causal, scale)
    spec = ring_spec(ring, q.shape[1], causal, scale, attend or reference_attend(scale),  # type: ignore[arg-type]
                     original_seq_len, t, backward)
    if replicated is None:
        return _RingFunction.apply(q, k, v, None, None, spec)
    out = _RingFunction.apply(torch.cat([q, replicated[0]], 1), k, v, replicated[1],
                              replicated[2], spec)
    return out[:, :q.shape[1]], out[:, q.shape[1]:]


__all__ = ["KV_MEMORY", "GroupTransport", "Piece", "Ring", "RingError", "RingSpec",
           "block_runs", "piece_queries", "plan_pieces", "ring_attention", "ring_backward",
           "ring_forward", "ring_spec"]
