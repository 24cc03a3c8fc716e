"""DistributedAttention's input checks: one rank's inputs (shapes, dtypes, devices; ShardError
names the offender), and the cross-rank check that every rank passed the same shapes, or every
rank raises ShardMismatchError before any large collective (so nothing hangs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from attnrt.parallel.groups import SequenceParallel, ShardError, ShardMismatchError, _all_gather
from attnrt.selection.request import DTYPE_NAMES

if TYPE_CHECKING:
    from attnrt.parallel.layers import DistributedAttention


def gather_ints(values: list[int], sp: SequenceParallel, device: torch.device) -> list[list[int]]:
    """Every rank's `values`, one list per rank: one small collective.

    The result is plain Python on purpose: a reduction over a tiny CPU tensor (e.g. min over
    dim 0) enters the intra-op thread pool, whose threads then spin for a while; once per
    forward on every rank, that spinning took ~15 cores per process on a 32-core H100 host
    and made each forward host-bound at 15-18 ms (bench/NOTES-distributed.md).
    """
    on = torch.device("cpu") if sp.meta_on_cpu else device
    mine = torch.tensor(values, dtype=torch.int64, device=on)
    out = torch.empty(sp.size * len(values), dtype=torch.int64, device=on)
    _all_gather(out, mine, sp.meta_group if sp.meta_group is not None else sp.group)
    flat = out.tolist()
    return [flat[r * len(values):(r + 1) * len(values)] for r in range(sp.size)]


_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_NO_TENSOR = (-1,) * 6


def _tensor_values(t: Any) -> tuple[int, ...]:
    """Seven ints per slot, whatever `t` is, so every rank gathers the same number of them
    (names in _FIELD_SUFFIXES)."""
    if not isinstance(t, torch.Tensor):
        return (int(t is not None), *_NO_TENSOR)
    shape = (*t.shape[:4], *((-1,) * (4 - t.dim()))) if t.dim() < 4 else tuple(t.shape[:4])
    code = _DTYPE_CODES.index(t.dtype) if t.dtype in _DTYPE_CODES else len(_DTYPE_CODES)
    return (1, t.dim(), *shape, code)


_FIELD_SUFFIXES = (" is given", ".dim()", ".shape[0]", ".shape[1]", ".shape[2]", ".shape[3]",
                   ".dtype")


def _show(field: str, value: int) -> str:
    if field.endswith(".dtype"):
        return (str(_DTYPE_CODES[value]).replace("torch.", "") if 0 <= value < len(_DTYPE_CODES)
                else "another dtype")
    if field == "original_seq_len" and value < 0:
        return "None" if value == _NONE_LENGTH else "not an int"
    if field.endswith(" is given"):
        return "a tensor" if value else "None"
    return str(value)


_MAX_CHECKED = 1024  # shape sets remembered by check_shards="new_shapes"


_NONE_LENGTH, _BAD_LENGTH = -1, -2  # original_seq_len None, or not an int (16.0, True, "16")


def _shape_key(named: list[tuple[str, Any]], original_seq_len: Any) -> tuple[int, ...]:
    # Every value a rank may pass maps to its own code: ranks that passed None and 16.0 must
    # differ here, or one raises in check_inputs while the other waits in the all-to-all.
    if original_seq_len is None:
        osl = _NONE_LENGTH
    elif isinstance(original_seq_len, int) and not isinstance(original_seq_len, bool):
        osl = original_seq_len
    else:
        osl = _BAD_LENGTH
    return (*(v for _, t in named for v in _tensor_values(t)), osl)


def _field_names(named: list[tuple[str, Any]]) -> list[str]:
    return [*(name + suffix for name, _ in named for suffix in _FIELD_SUFFIXES),
            "original_seq_len"]


def check_same_on_all_ranks(sp: SequenceParallel, named: list[tuple[str, Any]],
                            original_seq_len: Any,
                            agree: dict[str, int] | None = None) -> dict[str, int]:
    """Raise ShardMismatchError on every rank unless all ranks pass the same shapes.

    One all-gather of ~60 ints (on the gloo twin for device groups), before any large exchange:
    a rank that passed a different shard raises instead of leaving its peers in an all-to-all.
    `agree` rides along: each value comes back as its minimum over the ranks, so a choice that
    depends on per-rank state (e.g. whether the serving backend returns lse) is made alike.
    With sp.check_shards == "new_shapes", shapes this rank has seen pass before return what
    was agreed for them then, without a collective. Runs once per forward: plain tuples and
    lists throughout, names built only for the error.
    """
    agree = agree or {}
    # Shapes only: `agree` values are per-rank state (a fallback may change them on one rank),
    # and a key that can differ between ranks would let one of them skip the collective alone.
    key = _shape_key(named, original_seq_len)
    if sp.check_shards == "new_shapes" and key in sp.checked:
        return sp.checked[key]
    device = next((t.device for _, t in named if isinstance(t, torch.Tensor)), torch.device("cpu"))
    gathered = gather_ints([*key, *agree.values()], sp, device)
    n = len(key)
    agreed = {name: min(row[n + i] for row in gathered) for i, name in enumerate(agree)}
    rows = [row[:n] for row in gathered]
    if all(row == rows[0] for row in rows):
        if sp.check_shards == "new_shapes":
            if len(sp.checked) >= _MAX_CHECKED:  # every rank clears at the same call
                sp.checked.clear()
            sp.checked[key] = agreed
        return agreed
    names = _field_names(named)
    differ = [col for col in range(n) if any(row[col] != rows[0][col] for row in rows)]
    parts = []
    for col in differ[:3]:
        name = names[col]
        ranks = ", ".join(f"rank {r}: {_show(name, rows[r][col])}" for r in range(sp.size))
        parts.append(f"{name} differs ({ranks})")
    raise ShardMismatchError(f"sharded inputs differ across the sequence-parallel group: "
                             f"{'; '.join(parts)}; every rank must pass the same shapes")


# ---------------------------------------------------------------- one rank's inputs


def named_inputs(tensors: list[torch.Tensor], replicated: tuple[torch.Tensor | None, ...],
                 freqs_cis: Any) -> list[tuple[str, Any]]:
    """(name, tensor or None) of every input of one forward, in a fixed order for the check."""
    freqs = list(freqs_cis) if isinstance(freqs_cis, (tuple, list)) else [freqs_cis]
    freqs = (freqs + [None, None])[:2]
    slots = [*tensors, *([None] * (4 - len(tensors)))]
    return [*zip(("q", "k", "v", "gate_compress"), slots, strict=True),
            *zip(("replicated_q", "replicated_k", "replicated_v"), replicated, strict=True),
            *zip(("freqs_cis[0]", "freqs_cis[1]"), freqs, strict=True)]


def check_inputs(layer: DistributedAttention, sp: SequenceParallel, tensors: list[torch.Tensor],
                 replicated: tuple[torch.Tensor | None, ...], original_seq_len: Any,
                 freqs_cis: Any) -> None:
    """Shapes, dtypes and devices of one forward's inputs; ShardError names the offender."""
    h, hkv = layer.num_heads, layer.num_kv_heads
    _check_group("", tensors, (h, hkv, hkv, h), layer.head_size)
    q = tensors[0]
    for name, t in zip(("k", "v", "gate_compress")[:len(tensors) - 1], tensors[1:], strict=True):
        if t.shape[:2] != q.shape[:2]:
            raise ShardError(f"{name}.shape={tuple(t.shape)} and q.shape={tuple(q.shape)} differ "
                             "in batch or shard length; the shards of one sequence must match")
    full = q.shape[1] * sp.size
    if original_seq_len is not None and (isinstance(original_seq_len, bool) or not isinstance(
            original_seq_len, int) or not 0 < original_seq_len <= full):
        raise ShardError(f"original_seq_len={original_seq_len!r} is not allowed; allowed: None or "
                         f"an int in [1, {full}] (shard length {q.shape[1]} x {sp.size} ranks)")
    if replicated[0] is not None and all(r is not None for r in replicated):
        _check_group("replicated_", list(replicated), (h, hkv, hkv), layer.head_size, q)
        if replicated[0].shape[1] != replicated[1].shape[1]:  # type: ignore[union-attr]
            raise ShardError(f"replicated_q has {replicated[0].shape[1]} tokens and replicated_k "
                             f"{replicated[1].shape[1]}; they must match")  # type: ignore[union-attr]
    if freqs_cis is not None:
        _check_freqs(freqs_cis, q, original_seq_len or full, full)


def _check_group(prefix: str, tensors: list[Any], heads: tuple[int, ...], head_size: int,
                 like: torch.Tensor | None = None) -> None:
    like = like if like is not None else tensors[0]
    names = ("q", "k", "v", "gate_compress")[:len(tensors)]
    for name, t, want in zip(names, tensors, heads[:len(tensors)], strict=True):
        name = prefix + name
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ShardError(f"{name} has shape {got}; expected 4-D [B, S, H, D]")
        if t.shape[2] != want or t.shape[3] != head_size:
            raise ShardError(f"{name}.shape={tuple(t.shape)}: the layer was built for {want} "
                             f"heads of head_size={head_size}")
        if t.shape[0] != like.shape[0] or t.dtype != like.dtype or t.device != like.device:
            raise ShardError(f"{name} is {t.dtype} on {t.device} with batch {t.shape[0]}; "
                             f"expected q's: {like.dtype} on {like.device} with batch "
                             f"{like.shape[0]}")
    if like.dtype not in DTYPE_NAMES:
        raise ShardError(f"q.dtype={like.dtype} is not allowed; allowed: "
                         f"{', '.join(str(d) for d in DTYPE_NAMES)}")


def _check_freqs(freqs_cis: Any, q: torch.Tensor, valid: int, full: int) -> None:
    rows = {q.shape[1], valid, full}
    ok = (isinstance(freqs_cis, (tuple, list)) and len(freqs_cis) == 2
          and all(isinstance(f, torch.Tensor) and f.dim() == 2 and f.shape[0] in rows
                  and f.shape[1] == q.shape[3] // 2 for f in freqs_cis))
    if not ok:
        got = [tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
               for f in (freqs_cis if isinstance(freqs_cis, (tuple, list)) else [freqs_cis])]
        raise ShardError(f"freqs_cis shapes {got} are not allowed; allowed: (cos, sin), each "
                         f"[L, {q.shape[3] // 2}] with L in {sorted(rows)} (this shard, "
                         "original_seq_len or the padded sequence)")
