"""USP: DistributedAttention over a U x R mesh, Ulysses inside each ring rank, ring across.

Shapes: B batch, S this rank's shard, W = U x R ranks, N = S x W the padded sequence, H heads
(H' after padding), Hkv kv heads, Hp = H'/U heads per rank, T replicated tokens, D head size.

One forward, on every rank of the mesh (DistributedAttention._run forwards here when R > 1):

    check    one all-gather over all W ranks: shapes, and whether the backend each rank selects
             for each length of query rows its ring pieces will have (piece_queries; seq_len
             rules may choose per length) returns lse without hooks; a mismatch or a backend
             ring attention cannot use raises the same error, naming the backend, rule and
             piece length, on every rank, before any large collective
    rotary   q, k rotated at their global positions (the layout's, attnrt.parallel.zigzag)
    heads    padded with zero heads to H' where U does not divide H (see pad_heads); kv heads
             repeated only up to U where Hkv < U, never to H
    ulysses  q, k, v [B, S, H', D] -> [B, U*S, Hp, D]: this ring rank's block, Hp heads
    ring     ring attention over the R ring ranks (attnrt.parallel.ring) through the layer's
             backend's forward_with_lse; replicated tokens ride along (this rank's heads)
    back     [B, U*S, Hp, D] -> [B, S, H', D] -> the H real heads; replicated output gathered
             over heads; rows past original_seq_len are zeros

Backends without forward_with_lse, backends with preprocess/postprocess hooks (they need the
whole sequence on one rank) and DistributedAttention_VSA (VSA's sparse selection spans the
whole sequence) are refused with a ShardError that says so, on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnrt.errors import AttnrtError
from attnrt.interfaces import lse_forward
from attnrt.layers import LocalAttention, apply_rotary_emb
from attnrt.parallel.groups import ShardError, gather_heads, heads_to_seq, seq_to_heads
from attnrt.parallel.ring import piece_queries, ring_attention, ring_spec
from attnrt.parallel.shard_check import check_same_on_all_ranks
from attnrt.parallel.zigzag import shard_positions
from attnrt.selection.capability import declared


def pad_heads(num_heads: int, num_kv_heads: int, ulysses: int) -> tuple[int, int]:
    """(H', Hkv'): the fewest zero heads that let U ranks split the heads, GQA ratio kept.

    The other way out, more ring and less Ulysses, changes the mesh, which every layer shares;
    so a layer whose heads do not divide U pads (costing (H' - H) / H more attention on every
    rank, and no new kind of exchange), and the planner (attnrt.parallel.plan) picks a U that
    divides the model's heads in the first place. Hkv' is split like Ulysses splits kv heads:
    a multiple of U, or a divisor of U (each kv head then repeated for U / Hkv' ranks).
    """
    group = num_heads // num_kv_heads
    hkv = num_kv_heads
    while not (hkv % ulysses == 0 or (ulysses % hkv == 0 and hkv * group % ulysses == 0)):
        hkv += 1
    return hkv * group, hkv


def _locals(layer: Any, hp: int, hkvp: int) -> dict[bool, LocalAttention]:
    """The layer's LocalAttentions for ring pieces: {causal: ..., False: non-causal}."""
    out = {}
    for causal in {layer.causal, False}:
        key = f"usp_h{hp}_kv{hkvp}_c{int(causal)}"
        if key not in layer.locals:
            layer.locals[key] = LocalAttention(
                hp, layer.head_size, hkvp, layer.softmax_scale, causal,
                layer.supported_attention_backends, f"{layer.prefix}.impl",
                **layer.extra_impl_args)
        out[causal] = layer.locals[key]
    return out


def _piece_rows(usp: Any, q: Any, ulysses: int, causal: bool, original_seq_len: Any,
                replicated: tuple[Any, ...]) -> set[tuple[bool, int]]:
    """(causal, query rows) of every piece this ring rank will attend, so the backend is
    selected and checked at the lengths it runs (a seq_len rule may pick another backend for a
    zigzag half-block or the replicated rows than for the block). Never raises: inputs the
    checks after the gather refuse give the block length alone."""
    block = q.shape[1] * ulysses
    fallback = {(c, block) for c in {causal, False}}
    full = q.shape[1] * usp.world.size
    t = replicated[0].shape[1] if isinstance(replicated[0], torch.Tensor) else 0
    try:
        spec = ring_spec(usp.ring, block, causal, 1.0, None, original_seq_len or full, t)  # type: ignore[arg-type]
        return piece_queries(spec) or fallback
    except (AttnrtError, ValueError, TypeError):
        return fallback


def _ready(locals_: dict[bool, LocalAttention], q: Any, rows: set[tuple[bool, int]],
           ) -> tuple[dict[str, int], dict[str, list[str]]]:
    """What this rank's backends can do for its ring pieces (never raises: it runs before the
    shape check): {dense: every piece's request is method dense, lse: every piece's backend
    returns lse, no_hooks: none has hooks, replicated: every one declares
    SUPPORTS_REPLICATED_TOKENS}, and for each key the pieces
    that fail it, for the error."""
    failing: dict[str, list[str]] = {"dense": [], "lse": [], "no_hooks": [], "replicated": []}
    if not (isinstance(q, torch.Tensor) and q.dim() == 4 and q.dtype.is_floating_point):
        return dict.fromkeys(failing, 0), failing
    from attnrt.parallel.layers import _has_hooks

    for causal, n in sorted(rows):
        what = f"{n}-row {'causal ' if causal else ''}pieces"
        local = locals_[causal]
        try:
            impl = local.impl_for(q.dtype, q.device, n)
            decision = local.decision_for(q.dtype, q.device, n)
        except AttnrtError as exc:
            failing["lse"].append(f"no backend for {what}: {exc}")
            continue
        where = f"backend {decision.backend} (rule {decision.rule_where}) for {what}"
        for key, bad in (("dense", decision.request.method != "dense"),
                         ("lse", lse_forward(impl) is None), ("no_hooks", _has_hooks(impl)),
                         ("replicated", not declared(decision.backend_cls,
                                                     "SUPPORTS_REPLICATED_TOKENS"))):
            if bad:
                failing[key].append(where)
    return {key: int(not bad) for key, bad in failing.items()}, failing


def run_usp(layer: Any, tensors: list[torch.Tensor], original_seq_len: int | None,
            replicated: tuple[torch.Tensor | None, ...], freqs_cis: Any,
            sp: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DistributedAttention(_VSA).forward under a U x R mesh with R > 1 (module doc)."""
    from attnrt.parallel.shard_check import check_inputs, named_inputs

    usp = sp.usp
    h_pad, hkv_pad = pad_heads(layer.num_heads, layer.num_kv_heads, sp.size)
    hp, hkvp = h_pad // sp.size, max(1, hkv_pad // sp.size)
    locals_ = _locals(layer, hp, hkvp)
    q = tensors[0]
    rows = _piece_rows(usp, q, sp.size, layer.causal, original_seq_len, replicated) \
        if isinstance(q, torch.Tensor) and q.dim() == 4 else set()
    mine, failing = _ready(locals_, q, rows)
    agreed = mine
    if usp.world.check_shards:
        agreed = check_same_on_all_ranks(usp.world, named_inputs(tensors, replicated, freqs_cis),
                                         original_seq_len, mine)
    check_inputs(layer, usp.world, tensors, replicated, original_seq_len, freqs_cis)
    reps = _check_ring_backend(tensors, replicated, agreed, failing)
    q, k, v = tensors[:3]
    full = q.shape[1] * usp.world.size
    if freqs_cis is not None:
        q, k = _rotate(q, k, freqs_cis, usp, sp.rank, full)
    q, k, v, reps = _padded(layer, sp.size, (h_pad, hkv_pad), [q, k, v], reps)
    qh, kh, vh = (seq_to_heads(t, sp) for t in (q, k, v))
    rep_heads = (_rank_heads(reps[0], sp), _rank_heads(reps[1], sp),
                 _rank_heads(reps[2], sp)) if reps else None
    local = locals_

    def attend(qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor,
               causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return local[causal].forward_with_lse(qp, kp, vp)

    result = ring_attention(qh, kh, vh, usp.ring, causal=layer.causal,
                            softmax_scale=layer.softmax_scale,
                            original_seq_len=original_seq_len or full, replicated=rep_heads,
                            attend=attend, check=False)
    out, rep_out = result if isinstance(result, tuple) else (result, None)
    out = heads_to_seq(out, sp)[:, :, :layer.num_heads]
    if rep_out is None:
        return out, None
    return out, gather_heads(rep_out, sp)[:, :, :layer.num_heads]


def _check_ring_backend(tensors: list[torch.Tensor], replicated: tuple[Any, ...],
                        agreed: dict[str, int], failing: dict[str, list[str]],
                        ) -> list[torch.Tensor]:
    """After the shape check, so alike on every rank; returns the replicated tensors.
    failing: this rank's pieces whose backend fails each of _ready's keys, for the message."""
    if len(tensors) > 3:
        raise ShardError("DistributedAttention_VSA cannot run with ring > 1: VSA's sparse "
                         "block selection spans the whole sequence, which no ring rank holds; "
                         "allowed: ring=1 (Ulysses only) for VSA layers")

    def where(key: str) -> str:
        return "; ".join(failing[key]) or "a backend on another rank"

    if not agreed["dense"]:
        raise ShardError(f"{where('dense')} computes a sparse or custom method (not dense), "
                         "whose selection spans the whole sequence, which no ring rank holds; "
                         "allowed: dense attention, or ring=1 (Ulysses only)")

    if not agreed["lse"]:
        raise ShardError(f"ring attention merges pieces by lse, but {where('lse')} has no "
                         "forward_with_lse; allowed: a backend with forward_with_lse "
                         "(TORCH_SDPA, REFERENCE, ...) at every piece length (through "
                         "supported_attention_backends or the manifest's seq_len rules), "
                         "or ring=1")
    if not agreed["no_hooks"]:
        raise ShardError(f"{where('no_hooks')} has preprocess_qkv/postprocess_output hooks, "
                         "which need the whole sequence on one rank; allowed: ring=1")
    given = [r is not None for r in replicated]
    if not any(given):
        return []
    if not all(given):
        raise ShardError("replicated_q/k/v: some are None while others are given; allowed: "
                         "all of them, or none")
    if not agreed["replicated"]:
        raise ShardError(f"replicated_q is given but {where('replicated')} cannot attend "
                         "replicated tokens (SUPPORTS_REPLICATED_TOKENS = False)")
    return list(replicated)


def _padded(layer: Any, ulysses: int, padded: tuple[int, int], qkv: list[torch.Tensor],
            reps: list[torch.Tensor]) -> tuple[Any, ...]:
    """Zero heads appended up to H' and Hkv', then kv heads repeated up to U where Hkv' < U."""
    h_pad, hkv_pad = padded
    repeat = ulysses // hkv_pad if hkv_pad < ulysses else 1

    def grow(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        q, k, v = ts
        q = F.pad(q, (0, 0, 0, h_pad - q.shape[2]))
        k, v = (F.pad(t, (0, 0, 0, hkv_pad - t.shape[2])) for t in (k, v))
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, 2), v.repeat_interleave(repeat, 2)
        return [q, k, v]

    return (*grow(qkv), grow(reps) if reps else [])


def _rank_heads(t: torch.Tensor, sp: Any) -> torch.Tensor:
    """This Ulysses rank's heads of a replicated tensor [B, T, Hx, D] (Hx a multiple of U)."""
    b, r, h, d = t.shape
    return t.reshape(b, r, sp.size, h // sp.size, d)[:, :, sp.rank]


def _rotate(q: torch.Tensor, k: torch.Tensor, freqs_cis: Any, usp: Any, u: int,
            full: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary at the shard's global positions; rows past the given freqs rows (padding) by 0."""
    cos, sin = freqs_cis
    shard = q.shape[1]
    if cos.shape[0] != shard or full == shard:  # whole-sequence rows: this shard's positions
        ring = usp.ring
        rank = ring.rank * usp.ulysses + u
        pos = shard_positions(rank, shard, ring=ring.size, ulysses=usp.ulysses,
                              layout=ring.layout).to(cos.device)
        inside = (pos < cos.shape[0])[:, None]
        idx = pos.clamp(max=cos.shape[0] - 1)
        cos = torch.where(inside, cos[idx], torch.ones_like(cos[idx]))
        sin = torch.where(inside, sin[idx], torch.zeros_like(sin[idx]))
    return apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)


__all__ = ["pad_heads", "run_usp"]
