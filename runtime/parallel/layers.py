"""DistributedAttention and DistributedAttention_VSA: Ulysses sequence parallelism over attnrt.

Shapes: B batch, P the SP size, S = N/P tokens of this rank's shard, N the padded sequence,
H heads, Hkv kv heads, Hp = H/P heads per rank, R replicated tokens, D head size.

One forward, on every rank of the SP group (FastVideo's signatures and semantics):

    check    one all-gather of ~60 ints: every rank's shapes; a mismatch raises on every rank
    rotary   q, k rotated per shard, with the shard's positions (padding rows: angle 0)
    exchange q, k, v [B, S, H, D] -> [B, N, Hp, D] (kv heads repeated first when Hkv < P)
    trim     rows >= original_seq_len (padding) are sliced off, keys and queries alike
    hooks    impl.preprocess_qkv on [q; k; v] stacked along the batch, as FastVideo calls it
    joint    replicated tokens: this rank's heads of them appended after the sequence
    attend   a LocalAttention built for Hp heads: attnrt's selection, re-selection, fallback
    back     postprocess_output, pad, [B, N, Hp, D] -> [B, S, H, D]; replicated output
             all-gathered over heads (every rank returns it whole)

Padding is sliced off rather than masked: exact with every backend (none needs a mask
argument), and the padded queries cost no compute. Heads travel in `chunks` groups when no
gradient is needed, so chunk i+1 is exchanged while chunk i is attended; the differentiable
path exchanges all heads at once. Non-causal inference without padding, replicated tokens or
hooks takes the local-first schedule instead (attnrt.parallel.local_first): each rank attends its
own shard while the other heads travel, on the copy engines where two GPUs of one host allow.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnrt.context import get_forward_context
from attnrt.errors import AttnrtError
from attnrt.integrations.fastvideo import backend_name_to_enum
from attnrt.interfaces import AttentionImpl, lse_forward
from attnrt.layer_args import check_extras_known, check_layer_args, check_layer_dtype
from attnrt.layers import LocalAttention, apply_rotary_emb, impls_owned_by
from attnrt.parallel.groups import (
    SINGLE,
    SequenceParallel,
    SequenceParallelError,
    ShardError,
    gather_heads,
    gather_heads_raw,
    get_sequence_parallel,
    heads_to_seq,
    seq_to_heads,
    start_heads_to_seq,
    start_seq_to_heads,
)
from attnrt.parallel.local_first import local_first
from attnrt.parallel.shard_check import check_inputs, check_same_on_all_ranks, named_inputs
from attnrt.selection.capability import declared
from attnrt.selection.request import DTYPE_NAMES

# Heads chunks for overlap on device groups. Measured on 2x H100 (bench/NOTES-distributed.md):
# 4 chunks were slower than none at both shapes, so overlap is opt-in (overlap_chunks=...).
DEFAULT_CHUNKS = 1
MIN_OVERLAP_TOKENS = 4096  # below this the exchange is latency-bound and chunking only adds calls


def shard_heads(num_heads: int, num_kv_heads: int, size: int) -> tuple[int, int, int]:
    """(heads per rank, kv heads per rank, kv repeat) for SP size `size`; GQA keeps its ratio.

    kv heads split by P like query heads; with fewer kv heads than ranks (P % Hkv == 0) each kv
    head is repeated P/Hkv times before the exchange, so every rank receives the one kv head its
    query heads share.
    """
    if num_heads % size:
        raise ShardError(f"num_heads={num_heads} is not divisible by the sequence-parallel size "
                         f"{size}; allowed: a multiple of {size}")
    if num_kv_heads % size == 0:
        return num_heads // size, num_kv_heads // size, 1
    if size % num_kv_heads == 0:
        return num_heads // size, 1, size // num_kv_heads
    raise ShardError(f"num_kv_heads={num_kv_heads} cannot be split over the sequence-parallel "
                     f"size {size}; allowed: a multiple of {size} or a divisor of it")


@dataclass(frozen=True)
class _Plan:
    sp: SequenceParallel
    shard: int  # S
    valid: int  # original_seq_len: rows of the gathered sequence that are real tokens
    kv_repeat: int
    chunks: int
    copies: Any = None  # the group's PeerCopies, where every rank's data is on their GPU
    attended: int | None = None  # query rows the local attention sees (valid + replicated)

    @property
    def full(self) -> int:
        return self.shard * self.sp.size


def _overrides(impl: AttentionImpl, hook: str) -> bool:
    return getattr(type(impl), hook, None) not in (None, getattr(AttentionImpl, hook))


def _has_hooks(impl: AttentionImpl) -> bool:
    return _overrides(impl, "preprocess_qkv") or _overrides(impl, "postprocess_output")


class DistributedAttention(nn.Module):
    """Ulysses sequence-parallel attention through the backend attnrt selects for Hp heads.

    forward(q, k, v [B, S, H|Hkv, D] this rank's shard, original_seq_len=None,
            replicated_q/k/v [B, R, H|Hkv, D] (the same on every rank), freqs_cis=(cos, sin))
        -> (output [B, S, H, D], replicated output [B, R, H, D] or None)

    freqs_cis rows cover the whole sequence ([original_seq_len or N, D/2], FastVideo's form) or
    this shard ([S, D/2]); replicated tokens are not rotated. Outside torch.distributed, or with
    an SP group of one, plain q, k, v go straight to LocalAttention: no copy, no collective.
    """

    def __init__(self, num_heads: int, head_size: int, num_kv_heads: int | None = None,
                 softmax_scale: float | None = None, causal: bool = False,
                 supported_attention_backends: Any = None, prefix: str = "",
                 **extra_impl_args: Any) -> None:
        super().__init__()
        kv_heads, scale = check_layer_args(num_heads, head_size, num_kv_heads, softmax_scale,
                                           causal)
        check_extras_known(extra_impl_args)  # also without an SP group (no LocalAttention yet)
        # LocalAttention's dtype= (the compute dtype its first selection assumes), checked here
        # too: without an SP group no LocalAttention is built before forward.
        self.compute_dtype = check_layer_dtype(extra_impl_args.get("dtype"))
        self.num_heads, self.head_size = num_heads, head_size
        self.num_kv_heads = kv_heads
        self.softmax_scale = scale
        self.causal, self.prefix = causal, prefix
        self.supported_attention_backends = supported_attention_backends
        self.extra_impl_args = extra_impl_args
        self.locals = nn.ModuleDict()
        _keep_compile_out()
        # Select now when the SP group is known, so a bad head count fails at build time; a
        # missing group is left for forward to raise, on every rank.
        with contextlib.suppress(SequenceParallelError):
            sp = get_sequence_parallel()
            if sp.usp is None:  # USP pads heads that do not split (attnrt.parallel.usp)
                self.local_for(sp.size)

    def local_for(self, size: int, chunks: int = 1) -> LocalAttention:
        """The LocalAttention serving this layer's heads on each of `size` ranks, per chunk."""
        key = f"p{size}c{chunks}"
        if key not in self.locals:
            hp, hkvp, _ = shard_heads(self.num_heads, self.num_kv_heads, size)
            with impls_owned_by(self):  # one nn.Module impl (SLA's proj_l) at self.attn_impl
                self.locals[key] = LocalAttention(
                    hp // chunks, self.head_size, hkvp // chunks, self.softmax_scale,
                    self.causal, self.supported_attention_backends, f"{self.prefix}.impl",
                    **self.extra_impl_args)
        local: LocalAttention = self.locals[key]  # type: ignore[assignment]
        return local

    @property
    def attn_impl(self) -> AttentionImpl:
        """FastVideo's attribute: the impl for the current SP size, for the layer's dtype= (else
        the default dtype)."""
        dtype = self.compute_dtype or torch.get_default_dtype()
        return self.local_for(get_sequence_parallel().size).impl_for(dtype)

    @property
    def backend(self) -> Any:
        return backend_name_to_enum(self.local_for(get_sequence_parallel().size).backend_name)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                original_seq_len: int | None = None, replicated_q: torch.Tensor | None = None,
                replicated_k: torch.Tensor | None = None,
                replicated_v: torch.Tensor | None = None,
                freqs_cis: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._run([q, k, v], original_seq_len,
                         (replicated_q, replicated_k, replicated_v), freqs_cis)

    # -- the pipeline ------------------------------------------------------------------------

    def _run(self, tensors: list[torch.Tensor], original_seq_len: int | None,
             replicated: tuple[torch.Tensor | None, ...],
             freqs_cis: tuple[torch.Tensor, torch.Tensor] | None,
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        sp = get_sequence_parallel()
        if sp.usp is not None:  # a ring beside Ulysses: ring attention (attnrt.parallel.usp)
            from attnrt.parallel.usp import run_usp

            return run_usp(self, tensors, original_seq_len, replicated, freqs_cis, sp)
        base = self.local_for(sp.size)  # raises for heads that do not split, on every rank
        n = _local_length(tensors[0], sp.size, original_seq_len, replicated[0])
        reps, agreed = self._validate(sp, base, tensors, replicated, original_seq_len,
                                      freqs_cis, n)
        q, k, v = tensors[:3]
        impl = base.impl_for(q.dtype, q.device, n)
        hooks = _has_hooks(impl)
        full = q.shape[1] * sp.size
        if (sp.size == 1 and not reps and len(tensors) == 3 and not hooks
                and original_seq_len in (None, full)):
            return base(q, k, v, freqs_cis), None  # LocalAttention itself: bitwise the same
        if freqs_cis is not None:
            q, k = _rotate_shard(q, k, freqs_cis, sp)
        _, _, kv_repeat = shard_heads(self.num_heads, self.num_kv_heads, sp.size)
        if kv_repeat > 1:
            k, v = k.repeat_interleave(kv_repeat, 2), v.repeat_interleave(kv_repeat, 2)
        tensors = [q, k, v, *tensors[3:]]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in [*tensors, *reps])
        chunks = 1 if grad or hooks or sp.size == 1 else self._chunks(sp, full, len(tensors))
        plan = _Plan(sp, q.shape[1], original_seq_len or full, kv_repeat, chunks,
                     sp.peer_copies if agreed["copies"] else None, n)
        if grad or sp.size == 1:
            return self._differentiable(plan, tensors, reps)
        if not (hooks or reps or len(tensors) > 3) and self._local_first_applies(
                plan, agreed["lse"], base, q):
            return local_first(tensors, base, plan.sp, plan.copies), None
        return self._overlapped(plan, tensors, reps)

    def _local_first_applies(self, plan: _Plan, lse_ready: bool, base: LocalAttention,
                             q: torch.Tensor) -> bool:
        """Local-first needs lse from every rank's backend (agreed in the shape check), a
        non-causal layer, no padding (keys of the own shard must all be real) and no hooks in
        the backends of its own query lengths (the shard's, the other ranks'); by default it
        runs for data on an accelerator, without head chunking."""
        wanted = plan.sp.local_first
        if wanted is None:
            wanted = q.device.type != "cpu" and plan.sp.overlap_chunks in (None, 1)
        return (bool(wanted) and lse_ready and not self.causal and plan.valid == plan.full
                and not any(_has_hooks(base.impl_for(q.dtype, q.device, n))
                            for n in (plan.shard, plan.full - plan.shard)))

    def _validate(self, sp: SequenceParallel, base: LocalAttention, tensors: list[torch.Tensor],
                  replicated: tuple[torch.Tensor | None, ...], original_seq_len: int | None,
                  freqs_cis: Any, n: int | None) -> tuple[list[torch.Tensor], dict[str, bool]]:
        """Every check, in an order that raises the same error on every rank (or none).

        Returns the replicated tensors and what every rank can do: "lse", its backend returns
        lse; "copies", its data sits on the GPU of the group's PeerCopies (without the shape
        check: this rank's answers; check_shards=False trusts the ranks to agree)."""
        copies = sp.peer_copies
        mine = {"lse": _lse_ready(base, tensors[0]),
                "copies": (copies is not None and isinstance(tensors[0], torch.Tensor)
                           and tensors[0].device == copies.device)}
        agreed = mine
        if sp.size > 1 and sp.check_shards:  # the one collective before the large ones
            got = check_same_on_all_ranks(sp, named_inputs(tensors, replicated, freqs_cis),
                                          original_seq_len, {k: int(v) for k, v in mine.items()})
            agreed = {k: bool(v) for k, v in got.items()}
        check_inputs(self, sp, tensors, replicated, original_seq_len, freqs_cis)
        return self._check_backend(base, tensors[0], replicated, n), agreed

    def _chunks(self, sp: SequenceParallel, full: int, n_tensors: int) -> int:
        hp, hkvp, _ = shard_heads(self.num_heads, self.num_kv_heads, sp.size)
        want = sp.overlap_chunks
        if want is None:  # gloo shares the CPU cores with the compute: overlap buys nothing there
            want = 1 if "gloo" in sp.backend or full < MIN_OVERLAP_TOKENS else DEFAULT_CHUNKS
        if n_tensors > 3:
            return 1  # VSA impls see all heads at once, as FastVideo gives them
        common = math.gcd(hp, hkvp)
        return max(c for c in range(1, min(want, common) + 1) if common % c == 0)

    def _differentiable(self, plan: _Plan, tensors: list[torch.Tensor],
                        reps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        gathered = [seq_to_heads(t, plan.sp) for t in tensors]
        out, rep_out = self._attend_chunk(plan, gathered, reps, 0)
        return (heads_to_seq(out, plan.sp),
                gather_heads(rep_out, plan.sp) if rep_out is not None else None)

    def _overlapped(self, plan: _Plan, tensors: list[torch.Tensor],
                    reps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        sp, chunks = plan.sp, plan.chunks
        out = torch.empty_like(tensors[0])  # [B, S, H, D]
        inflight = [[start_seq_to_heads(t, sp, 0, chunks) for t in tensors]]
        backs, rep_parts = [], []
        for c in range(chunks):
            if c + 1 < chunks:  # chunk c+1 travels while chunk c is attended
                inflight.append([start_seq_to_heads(t, sp, c + 1, chunks) for t in tensors])
            gathered = [p.wait() for p in inflight[c]]
            inflight[c] = []
            part, rep_part = self._attend_chunk(plan, gathered, reps, c)
            backs.append(start_heads_to_seq(part, sp, out, c, chunks))
            rep_parts.append(rep_part)
        for pending in backs:
            pending.wait()
        if not reps:
            return out, None
        return out, gather_heads_raw(torch.cat(rep_parts, dim=2), sp)  # type: ignore[arg-type]

    def _attend_chunk(self, plan: _Plan, gathered: list[torch.Tensor], reps: list[torch.Tensor],
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """gathered [B, N, Hc, D] each -> (output [B, N, Hc, D], replicated output or None)."""
        local = self.local_for(plan.sp.size, plan.chunks)
        impl = local.impl_for(gathered[0].dtype, gathered[0].device, plan.attended)
        metadata = get_forward_context().attn_metadata
        if plan.valid < plan.full:
            gathered = [t[:, :plan.valid] for t in gathered]
        gathered = _preprocess(impl, gathered, metadata)
        if reps:
            repeats = (1, plan.kv_repeat, plan.kv_repeat)
            gathered[:3] = [torch.cat([t, _rank_heads(r, plan, chunk, repeat)], dim=1)
                            for t, r, repeat in zip(gathered[:3], reps, repeats, strict=True)]
        out = self._attend(local, impl, gathered, metadata)
        rep_out = None
        if reps:
            out, rep_out = out[:, :plan.valid], out[:, plan.valid:]
        out = impl.postprocess_output(out, metadata)
        if plan.valid < plan.full:
            out = F.pad(out, (0, 0, 0, 0, 0, plan.full - plan.valid))
        return out, rep_out

    def _attend(self, local: LocalAttention, impl: AttentionImpl, gathered: list[torch.Tensor],
                metadata: Any) -> torch.Tensor:
        return local(*gathered[:3])

    def _check_backend(self, base: LocalAttention, q: torch.Tensor,
                       replicated: tuple[torch.Tensor | None, ...],
                       n: int | None) -> list[torch.Tensor]:
        """After the shape check, so alike on every rank: what the backend serving n query
        rows must take (replicated tokens here). Returns the replicated tensors."""
        given = [r is not None for r in replicated]
        if not any(given):
            return []
        if not all(given):
            names = ", ".join(f"replicated_{n}" for n, g in zip("qkv", given, strict=True) if not g)
            raise ShardError(f"{names} is None while other replicated tensors are given; "
                             "allowed: all of replicated_q, replicated_k, replicated_v, or none")
        decision = base.decision_for(q.dtype, q.device, n)
        if not declared(decision.backend_cls, "SUPPORTS_REPLICATED_TOKENS"):
            raise ShardError(f"replicated_q is given but backend {decision.backend} cannot attend "
                             "replicated tokens (SUPPORTS_REPLICATED_TOKENS = False); allowed: "
                             "no replicated tokens with this backend")
        return list(replicated)  # type: ignore[arg-type]


class DistributedAttention_VSA(DistributedAttention):  # noqa: N801 - FastVideo's name
    """DistributedAttention whose impl also takes gate_compress [B, S, H, D] (video sparse attn).

    gate_compress travels with q, k, v and reaches impl.forward(q, k, v, gate_compress,
    attn_metadata). Replicated tokens are refused: VSA tiles the video sequence.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                original_seq_len: int | None, replicated_q: torch.Tensor | None = None,
                replicated_k: torch.Tensor | None = None,
                replicated_v: torch.Tensor | None = None,
                gate_compress: torch.Tensor | None = None,
                freqs_cis: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if any(r is not None for r in (replicated_q, replicated_k, replicated_v)):
            raise ShardError("replicated_q/k/v are not supported by DistributedAttention_VSA "
                             "(VSA tiles the video sequence); allowed: None")
        if gate_compress is None:
            raise ShardError("gate_compress=None; DistributedAttention_VSA needs a tensor "
                             "shaped like q [B, S, H, D]")
        return self._run([q, k, v, gate_compress], original_seq_len, (None, None, None),
                         freqs_cis)

    def _check_backend(self, base: LocalAttention, q: torch.Tensor,
                       replicated: tuple[torch.Tensor | None, ...],
                       n: int | None) -> list[torch.Tensor]:
        """The backend serving n query rows must take the gate (after the shape check, so
        alike on every rank)."""
        decision = base.decision_for(q.dtype, q.device, n)
        accepts = declared(decision.backend_cls, "ACCEPTS_GATE_COMPRESS")
        if accepts is None:
            accepts = _forward_takes_gate(decision.backend_cls.get_impl_cls())
        if not accepts:
            raise ShardError(f"backend {decision.backend} does not take gate_compress "
                             "(ACCEPTS_GATE_COMPRESS = False); allowed: a VSA backend, chosen "
                             "with supported_attention_backends or the manifest")
        # An impl may check the metadata against the sequence here, before the exchanges.
        check = getattr(decision.backend_cls.get_impl_cls(), "check_attn_metadata", None)
        if callable(check):
            check(get_forward_context().attn_metadata, n)
        return super()._check_backend(base, q, replicated, n)

    def _attend(self, local: LocalAttention, impl: AttentionImpl, gathered: list[torch.Tensor],
                metadata: Any) -> torch.Tensor:
        q, k, v, gate = gathered
        return impl.forward(q, k, v, gate, metadata)  # type: ignore[call-arg]


def _forward_takes_gate(impl_cls: Any) -> bool:
    """forward(query, key, value, gate_compress, attn_metadata): five parameters after self."""
    try:
        params = list(inspect.signature(impl_cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.name == "gate_compress" for p in params) or len(positional) >= 5


_compile_kept_out = False


def _keep_compile_out() -> None:
    """torch.compile must not trace the exchanges (FastVideo's layers say @torch.compiler.disable).

    Applied at the first layer's construction, not as a decorator: torch.compiler.disable imports
    torch._dynamo (about 1.5 s), and importing attnrt must stay cheap.
    """
    global _compile_kept_out
    if not _compile_kept_out:
        for cls in (DistributedAttention, DistributedAttention_VSA):
            cls.forward = torch.compiler.disable(cls.__dict__["forward"])  # type: ignore[method-assign]
        _compile_kept_out = True


def _local_length(q: Any, size: int, original_seq_len: Any, replicated_q: Any) -> int | None:
    """The query length the local attention sees (real tokens of the gathered sequence, then
    the replicated ones), which rules may rank by; None for inputs the checks will refuse."""
    if not (isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[1] > 0):
        return None
    full = q.shape[1] * size
    valid = original_seq_len if (isinstance(original_seq_len, int)
                                 and not isinstance(original_seq_len, bool)
                                 and 0 < original_seq_len <= full) else full
    extra = replicated_q.shape[1] if (isinstance(replicated_q, torch.Tensor)
                                      and replicated_q.dim() == 4) else 0
    return valid + extra


def _lse_ready(local: LocalAttention, q: Any) -> bool:
    """Whether the impl this rank's local attention serves a shard's queries with (local
    first's steps A and C) returns lse. Never raises: it runs before the shape check, which
    must be the first thing every rank does (selection errors come after it)."""
    if not (isinstance(q, torch.Tensor) and q.dtype in DTYPE_NAMES and q.dim() == 4):
        return False  # e.g. float8: the shape check, then check_inputs, refuse it everywhere
    try:
        return lse_forward(local.impl_for(q.dtype, q.device, q.shape[1])) is not None
    except (AttnrtError, TypeError, ValueError):
        return False


def _preprocess(impl: AttentionImpl, tensors: list[torch.Tensor],
                metadata: Any) -> list[torch.Tensor]:
    if not _overrides(impl, "preprocess_qkv"):
        return tensors
    if all(t.shape == tensors[0].shape for t in tensors):  # FastVideo's call: [q; k; v] stacked
        stacked = impl.preprocess_qkv(torch.cat(tensors, dim=0), metadata)
        return list(stacked.chunk(len(tensors), dim=0))
    return [impl.preprocess_qkv(t, metadata) for t in tensors]  # GQA: shapes differ


def _rank_heads(t: torch.Tensor, plan: _Plan, chunk: int, repeat: int) -> torch.Tensor:
    """This rank's heads (of chunk `chunk`) of a replicated tensor [B, R, Hx, D]."""
    if repeat > 1:
        t = t.repeat_interleave(repeat, dim=2)
    b, r, h, d = t.shape
    p = plan.sp.size
    return t.reshape(b, r, p, plan.chunks, h // (p * plan.chunks), d)[:, :, plan.sp.rank, chunk]


def _rotate_shard(q: torch.Tensor, k: torch.Tensor, freqs_cis: tuple[torch.Tensor, torch.Tensor],
                  sp: SequenceParallel) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = freqs_cis
    shard = q.shape[1]
    if cos.shape[0] != shard or sp.size == 1:  # whole-sequence rows: take this shard's
        start = sp.rank * shard
        cos, sin = cos[start:start + shard], sin[start:start + shard]
    missing = shard - cos.shape[0]
    if missing > 0:  # padding rows past original_seq_len: rotate by angle 0
        cos = torch.cat([cos, cos.new_ones(missing, cos.shape[1])])
        sin = torch.cat([sin, sin.new_zeros(missing, sin.shape[1])])
    return apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)


__all__ = ["SINGLE", "DistributedAttention", "DistributedAttention_VSA", "shard_heads"]
