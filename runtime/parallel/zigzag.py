"""Sequence layouts of ring / USP sequence parallelism, and the shard / unshard helpers.

Shapes: B batch, N the (padded) sequence, S = N / W tokens per rank, W = U x R ranks, U the
Ulysses size, R the ring size, c = N / (2R) tokens per zigzag chunk.

Global SP rank g = r * U + u: r its ring rank, u its Ulysses rank (Ulysses innermost, so the
U ranks of one Ulysses group are neighbours, inside one node). The Ulysses all-to-all of the
U shards u = 0 .. U-1 of ring rank r gathers that ring rank's block of U x S tokens, in order.

    contiguous   ring rank r holds tokens [r*U*S, (r+1)*U*S): FastVideo's sharding
    zigzag       the sequence is cut into 2R chunks of c tokens; ring rank r holds chunk r and
                 chunk 2R-1-r, in that order ([chunk r; chunk 2R-1-r], 2c = U*S tokens), and
                 its Ulysses rank u takes rows [u*S, (u+1)*S) of that pair

Under causal attention every query sees the keys at or before it, so with the contiguous
layout ring rank R-1 has R times the work of rank 0. With zigzag every ring rank has one early
and one late chunk: each ring step costs the same on every rank (half a block, or the causal
diagonal block), so no rank idles. The pairing is also called head-tail.

    x = torch.randn(B, N, H, D)
    shard = shard_sequence(x, rank=g, ring=R, ulysses=U, layout="zigzag")      # [B, S, H, D]
    y = unshard_sequence([shard_0, ..., shard_{W-1}], ring=R, ulysses=U, layout="zigzag")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnrt.errors import AttnrtError

LAYOUTS = ("contiguous", "zigzag")


class LayoutError(AttnrtError, ValueError):
    """A sequence layout, or a length, that ring sequence parallelism cannot shard."""


def check_layout(layout: str, ring: int, block: int | None = None) -> None:
    """Raise LayoutError unless `layout` is known and, for zigzag, `block` (U x S) is even."""
    if layout not in LAYOUTS:
        raise LayoutError(f"layout={layout!r} is not allowed; allowed: {', '.join(LAYOUTS)}")
    if layout == "zigzag" and block is not None and block % 2:
        raise LayoutError(f"layout='zigzag' needs an even number of tokens per ring rank; got "
                          f"{block} (shard length x ulysses size); pad the sequence to a "
                          f"multiple of {2 * ring} x ulysses size")


def ring_runs(layout: str, ring: int, ring_rank: int, block: int) -> list[tuple[int, int]]:
    """(global start, length) of the token runs ring rank `ring_rank` holds, in local order;
    `block` = U x S tokens per ring rank."""
    if layout == "contiguous":
        return [(ring_rank * block, block)]
    half = block // 2
    return [(ring_rank * half, half), ((2 * ring - 1 - ring_rank) * half, half)]


def shard_positions(rank: int, shard: int, *, ring: int, ulysses: int = 1,
                    layout: str = "contiguous") -> torch.Tensor:
    """Global positions [S] of the rows of SP rank `rank`'s shard of `shard` tokens (int64)."""
    block = shard * ulysses
    check_layout(layout, ring, block)
    r, u = divmod(rank, ulysses)
    runs = ring_runs(layout, ring, r, block)
    rows = torch.cat([torch.arange(start, start + length) for start, length in runs])
    return rows[u * shard:(u + 1) * shard]


def _shard_length(n: int, world: int, layout: str, ring: int) -> int:
    step = world * (2 if layout == "zigzag" else 1)
    return -(-n // step) * step // world


def shard_sequence(x: torch.Tensor, rank: int, *, ring: int, ulysses: int = 1,
                   layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """x [B, N, H, D] (the whole sequence along `dim`) -> SP rank `rank`'s shard [B, S, H, D].

    The sequence is zero-padded at its end to S x W tokens (S even x W for zigzag); pass the
    unpadded N as original_seq_len to DistributedAttention.
    """
    world = ring * ulysses
    if not 0 <= rank < world:
        raise LayoutError(f"rank={rank} is not allowed; allowed: 0 .. {world - 1} "
                          f"(ring {ring} x ulysses {ulysses})")
    check_layout(layout, ring)
    shard = _shard_length(x.shape[dim], world, layout, ring)
    pad = shard * world - x.shape[dim]
    if pad:
        widths = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, pad]
        x = F.pad(x, widths)
    index = shard_positions(rank, shard, ring=ring, ulysses=ulysses, layout=layout)
    return x.index_select(dim, index.to(x.device))


def unshard_sequence(shards: list[torch.Tensor], *, ring: int, ulysses: int = 1,
                     layout: str = "contiguous", dim: int = 1,
                     length: int | None = None) -> torch.Tensor:
    """The W shards [B, S, H, D] (in SP rank order) -> the sequence [B, N, H, D]; `length`
    cuts the padding off (default: keep all S x W rows). Inverse of shard_sequence."""
    if len(shards) != ring * ulysses:
        raise LayoutError(f"{len(shards)} shards given; allowed: ring x ulysses = "
                          f"{ring * ulysses}")
    shard = shards[0].shape[dim]
    order = torch.cat([shard_positions(g, shard, ring=ring, ulysses=ulysses, layout=layout)
                       for g in range(len(shards))])
    joined = torch.cat(shards, dim=dim)
    out = joined.index_select(dim, torch.argsort(order).to(joined.device))
    return out if length is None else out.narrow(dim, 0, length)


def zigzag_shard(x: torch.Tensor, rank: int, *, ring: int, ulysses: int = 1,
                 dim: int = 1) -> torch.Tensor:
    """shard_sequence with layout="zigzag" (the load-balanced causal layout)."""
    return shard_sequence(x, rank, ring=ring, ulysses=ulysses, layout="zigzag", dim=dim)


def zigzag_unshard(shards: list[torch.Tensor], *, ring: int, ulysses: int = 1, dim: int = 1,
                   length: int | None = None) -> torch.Tensor:
    """unshard_sequence with layout="zigzag"."""
    return unshard_sequence(shards, ring=ring, ulysses=ulysses, layout="zigzag", dim=dim,
                            length=length)


__all__ = ["LAYOUTS", "LayoutError", "ring_runs", "shard_positions", "shard_sequence",
           "unshard_sequence", "zigzag_shard", "zigzag_unshard"]
