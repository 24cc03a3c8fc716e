"""Local-first Ulysses: each rank attends its own shard while the other ranks' heads travel.

DistributedAttention runs this schedule for non-causal calls without padding, replicated
tokens or hooks, where every rank's backend returns lse (agreed in the shape check). Per
batch row:

    send      the other ranks' heads of q, k, v: packed on a side stream and exchanged by
              NCCL, or, where the group has PeerCopies (two GPUs of one host), copied
              straight from their strided head ranges into the peer's memory as 2D memcpys
              on the copy engines (attnrt.parallel.peer_copies)
    A         own queries over own keys, this rank's heads: needs no exchange, with lse
    B         the other ranks' queries over all keys; their outputs start back at once
    C         own queries over the other ranks' keys, with lse; merged with A straight
              into the output's own heads (exact: disjoint key sets, see merge_partials)

The exchange runs beside A and the return beside C. B runs on a compute stream of its own,
so it starts on the SMs that A's last wave leaves idle, and C on those of B's last wave.
The attention kernels on Hopper (cuDNN's) are persistent: once started they hold every SM,
and work queued beside them that needs an SM waits for their end. So with NCCL, A is queued
only after the packing, when the exchange (on a high-priority stream) is ready to take its
SMs first; the copy engines need no SM at all. See bench/NOTES-distributed.md. Keys are not
in sequence order (the peer's rows first for P = 2, own rows first otherwise), which
non-causal attention does not see. A, B and C go through `local`, so a compile failure falls
to the next backend on this rank without changing the exchanges.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from attnrt.interfaces import merge_partials
from attnrt.layers import LocalAttention
from attnrt.parallel.groups import Pending, SequenceParallel
from attnrt.parallel.peer_copies import copy_rows, recorded
from attnrt.parallel.streams import beside, head_start, join_stream, side_stream


def local_first(tensors: list[torch.Tensor], local: LocalAttention, sp: SequenceParallel,
                copies: Any) -> torch.Tensor:
    """q, k, v shards [B, S, Hx, D] -> the output shard [B, S, H, D], one batch row at a time;
    `copies` is the group's PeerCopies (P = 2 on one host) or None (NCCL, gloo)."""
    q = tensors[0]
    # Contiguous whatever q's layout: the exchange writes the peers' heads of each row through
    # [S, Hp * D] views of it, which only a contiguous row block has.
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for b in range(q.shape[0]):
        _row([t[b:b + 1] for t in tensors[:3]], local, sp, copies, out[b:b + 1])
    return out


def _row(qkv: list[torch.Tensor], local: LocalAttention, sp: SequenceParallel, copies: Any,
         out: torch.Tensor) -> None:
    """One batch row: qkv [1, S, Hx, D] -> written into out [1, S, H, D]."""
    p = sp.size
    peers = [peer for peer in range(p) if peer != sp.rank]
    rank_heads = [t.unflatten(2, (p, -1)) for t in qkv]  # [1, S, P, Hx/P, D]
    own = [t[:, :, sp.rank] for t in rank_heads]
    works: list[Any] = []
    back: list[Any] = []
    joins: list[Any] = []
    try:
        if copies is not None:  # PeerCopies serve two ranks only
            exchanged = exchange_two_on_copy_engines(rank_heads, own, peers, copies)
        elif p == 2:
            exchanged = exchange_two(rank_heads, own, peers, sp)
        else:
            exchanged = exchange_many(rank_heads, own, peers, sp)
        q_in, k_all, v_all, theirs, fill_own, works = exchanged
        fork = recorded(q_in.device)  # B's stream starts after this, not after A
        o_a, lse_a = local.forward_with_lse(*own)  # A
        heads = out[0].view(out.shape[1], p, -1)  # [S, P, Hp * D], views (raises otherwise)
        with beside(q_in.device, fork, joins):
            for work in works:
                work.wait()
            fill_own()  # an SM copy: it runs in A's last wave
            arrived = recorded(q_in.device)
            out_b = local(q_in, k_all, v_all)  # B
            back = [send_back(out_b, sp, copies, [heads[:, j] for j in peers])]
        arrived.wait()
        if joins:  # B first: C waits for the fill too, and then for a ~10 us kernel
            head_start(q_in.device)
        o_c, lse_c = local.forward_with_lse(own[0], k_all[:, theirs], v_all[:, theirs])  # C
        merge_partials(o_a, lse_a, o_c, lse_c, out=out.unflatten(2, (p, -1))[:, :, sp.rank])
    except BaseException:
        if copies is not None:  # keep the peer's copy-engine barriers paired
            with side_stream(out.device):
                copies.abandon()
        raise
    finally:  # also on an error: no buffer may go while a stream or collective still uses it
        for pending in (*joins, *works, *back):  # back places the peers' part of the output
            pending.wait()


Exchanged = tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice, Any, list[Any]]


def exchange_two(rank_heads: list[torch.Tensor], own: list[torch.Tensor], peers: list[int],
                 sp: SequenceParallel) -> Exchanged:
    """Local-first exchange for P = 2: q, k and v travel in one collective (one kernel, so
    nothing queues behind it while attention runs). One buffer holds [q_o | kv_o | kv_own]:
    what arrives (q_o, then the peer's k and v heads interleaved per row) is contiguous, and so
    are all keys, peer's rows first. Returns (q_in [1, S, Hp, D], k_all, v_all [1, 2S, Hkvp,
    D] views, the peer's key rows, a function that fills the own rows, the works)."""
    q_heads, k_heads, v_heads = (t[0, :, peers[0]] for t in rank_heads)  # [S, Hx/2, D]
    s, hp, d = q_heads.shape
    hkvp = k_heads.shape[1]
    n_q, n_kv = s * hp * d, s * 2 * hkvp * d
    buf = q_heads.new_empty(n_q + 2 * n_kv)
    kv_all = buf[n_q:].view(1, 2 * s, 2, hkvp, d)
    with side_stream(q_heads.device) as stream:
        send = q_heads.new_empty(n_q + n_kv)
        send[:n_q].view(s, hp, d).copy_(q_heads)
        kv_send = send[n_q:].view(s, 2, hkvp, d)
        kv_send[:, 0].copy_(k_heads)
        kv_send[:, 1].copy_(v_heads)
        works = exchange_others(send.view(1, -1), buf[:n_q + n_kv].view(1, -1), sp)
        head_start(q_heads.device)
    join_stream(q_heads.device, stream)

    def fill_own() -> None:
        kv_all[0, s:, 0].copy_(own[1][0])
        kv_all[0, s:, 1].copy_(own[2][0])

    keep = Pending(works, lambda: buf, (send,))
    return (buf[:n_q].view(1, s, hp, d), kv_all[:, :, 0], kv_all[:, :, 1], slice(0, s),
            fill_own, [keep])


def exchange_two_on_copy_engines(rank_heads: list[torch.Tensor], own: list[torch.Tensor],
                                 peers: list[int], copies: Any) -> Exchanged:
    """exchange_two's layout, filled by 2D copies straight from the strided head ranges: the
    peer's heads go into the peer's inbox on copy engines beside A (no packing kernel to wait
    for); fill_own copies the own k and v rows into this rank's inbox (a device-local 2D
    memcpy, which, measured on H100 and H200, waits for free SMs like a kernel: _row queues
    it on B's stream, where it takes SMs in A's last wave)."""
    q_heads, k_heads, v_heads = (t[0, :, peers[0]] for t in rank_heads)  # [S, Hx/2, D]
    s, hp, d = q_heads.shape
    hkvp = k_heads.shape[1]
    n_q, n_kv = s * hp * d, s * 2 * hkvp * d
    copies.begin({"fwd": n_q + 2 * n_kv, "back": n_q}, q_heads.dtype)
    buf = copies.inbox("fwd")
    kv_all = buf[n_q:].view(1, 2 * s, 2, hkvp, d)

    def write(region: torch.Tensor) -> None:
        kv_peer = region[n_q:n_q + n_kv].view(s, 2, hkvp * d)
        copy_rows(region[:n_q].view(s, hp * d), q_heads.flatten(1))
        copy_rows(kv_peer[:, 0], k_heads.flatten(1))
        copy_rows(kv_peer[:, 1], v_heads.flatten(1))

    try:
        with side_stream(q_heads.device):
            try:
                copies.send_with("fwd", write)
            finally:
                works = [recorded(q_heads.device)]
    except BaseException:
        works[0].wait()  # what was queued reads the inputs: order it before they may go
        raise
    keep = Pending(works, lambda: buf, (q_heads, k_heads, v_heads))
    kv_own = kv_all[0, s:].flatten(2)  # [S, 2, Hkvp * D]

    def fill_own() -> None:
        copy_rows(kv_own[:, 0], own[1][0].flatten(1))
        copy_rows(kv_own[:, 1], own[2][0].flatten(1))

    return (buf[:n_q].view(1, s, hp, d), kv_all[:, :, 0], kv_all[:, :, 1], slice(0, s),
            fill_own, [keep])


def send_back(out_b: torch.Tensor, sp: SequenceParallel, copies: Any,
              targets: list[torch.Tensor]) -> Pending:
    """Return B's output [1, S, Hp, D] (the peer's queries) to its owner, and place what the
    peers return into `targets` (one [S, Hp * D] view of the output per peer, peers in order)
    once the Pending is waited for. On copy engines the placing is queued on the side stream
    after the return (a device-local 2D copy: it starts once C leaves SMs free, beside the
    merge)."""
    hp, d = out_b.shape[2], out_b.shape[3]
    send_back = out_b.reshape(-1, hp * d)
    if copies is not None:
        try:
            with side_stream(out_b.device):
                try:
                    copies.send("back", send_back)
                    copy_rows(targets[0], copies.inbox("back").view(send_back.shape))
                finally:
                    done = recorded(out_b.device)
        except BaseException:
            done.wait()  # what was queued reads send_back and writes out: order it first
            raise
        return Pending([done], lambda: send_back, (send_back,))
    recv_back = torch.empty_like(send_back)

    def place() -> torch.Tensor:
        rows = send_back.shape[0]
        for j, target in enumerate(targets):
            target.copy_(recv_back[j * rows // len(targets):(j + 1) * rows // len(targets)])
        return recv_back

    pending = Pending(exchange_others(send_back, recv_back, sp), place, (send_back,))
    head_start(out_b.device)
    return pending


def exchange_many(rank_heads: list[torch.Tensor], own: list[torch.Tensor], peers: list[int],
                  sp: SequenceParallel) -> Exchanged:
    """Local-first exchange for P > 2: one collective per tensor (an arriving peer block holds
    q, k and v, which would not leave all keys contiguous); keys own rows first."""
    q = rank_heads[0]
    s, hp, d = q.shape[1], q.shape[3], q.shape[4]
    hkvp = rank_heads[1].shape[3]
    q_in = q.new_empty((len(peers) * s, hp * d))
    kv_all = [q.new_empty((1, (len(peers) + 1) * s, hkvp, d)) for _ in range(2)]
    recvs = [q_in, *(t[0, s:].view(-1, hkvp * d) for t in kv_all)]
    with side_stream(q.device) as stream:
        sends = [pack_peers(t[0], peers) for t in rank_heads]
        works = [w for send, recv in zip(sends, recvs, strict=True)
                 for w in exchange_others(send, recv, sp)]
        head_start(q.device)
    join_stream(q.device, stream)

    def fill_own() -> None:
        for t, mine in zip(kv_all, own[1:], strict=True):
            t[:, :s].copy_(mine)

    keep = Pending(works, lambda: q_in, tuple(sends))
    return q_in.view(1, -1, hp, d), kv_all[0], kv_all[1], slice(s, None), fill_own, [keep]


def exchange_others(send: torch.Tensor, recv: torch.Tensor, sp: SequenceParallel) -> list[Any]:
    """Start an all-to-all that skips this rank: send/recv [(P-1) * R, ...], rows j*R ... j*R+R
    go to / come from the j-th other rank of the group (ranks in order, this one left out)."""
    rows = send.shape[0] // (sp.size - 1)
    if sp.all_to_all == "single":
        sizes = [0 if peer == sp.rank else rows for peer in range(sp.size)]
        return [dist.all_to_all_single(recv, send, sizes, sizes, group=sp.group, async_op=True)]
    ops = []
    others = [peer for peer in range(sp.size) if peer != sp.rank]
    for j, peer in enumerate(others):
        global_peer = dist.get_global_rank(sp.group, peer)
        part = slice(j * rows, (j + 1) * rows)
        ops.append(dist.P2POp(dist.isend, send[part], global_peer, sp.group))
        ops.append(dist.P2POp(dist.irecv, recv[part], global_peer, sp.group))
    return dist.batch_isend_irecv(ops)


def pack_peers(x: torch.Tensor, peers: list[int]) -> torch.Tensor:
    """x [S, P, Hx/P, D] -> [(P-1) * S, Hx/P * D]: each peer's heads, peers in order (one copy)."""
    s, _, hx, d = x.shape
    send = x.new_empty((len(peers), s, hx, d))
    for j, peer in enumerate(peers):
        send[j].copy_(x[:, peer])
    return send.view(-1, hx * d)
