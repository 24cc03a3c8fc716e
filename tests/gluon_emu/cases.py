"""The runner's cases: each runs a Gluon kernel under the emulator (fake.install first) and
returns rel L2 errors against float64 references, the lse -inf pattern, what launched.

Shapes: B batch, N query length, M key length, H query heads, Hkv key/value heads, D head
size; q [B, N, H, D], k / v [B, M, Hkv, D], lse [B, H, N]. A case is a dict (JSON):
    {"kind": "block_sparse", "seed", "b", "n", "m", "h", "hkv", "d", "bq", "bk", "dtype",
     "valid": bool (random partial key_block_valid, block 0 empty), "backward": bool}
    {"kind": "dense", "seed", "b", "n", "m", "h", "hkv", "d", "dtype", "causal", "backward"}
    {"kind": "engine", "name": tests.engine.cases name or "plain" / "causal", "b", "n", "h",
     "d", "dtype"}
"""

from __future__ import annotations

import math

import torch

from . import fake

LOG2E = 1.4426950408889634


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _qkv(c: dict, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    dtype = getattr(torch, c["dtype"])
    return (torch.randn(c["b"], c["n"], c["h"], c["d"], generator=gen).to(dtype),
            torch.randn(c["b"], c["m"], c["hkv"], c["d"], generator=gen).to(dtype),
            torch.randn(c["b"], c["m"], c["hkv"], c["d"], generator=gen).to(dtype))


def _lse_result(lse: torch.Tensor, r_lse: torch.Tensor) -> dict:
    fin = torch.isfinite(r_lse)
    return {"lse_inf_match": bool(torch.equal(torch.isneginf(lse), torch.isneginf(r_lse))),
            "lse": rel(lse[fin], r_lse[fin]) if fin.any() else 0.0,
            "rows_without_keys": int((~fin).sum())}


def _poisoned(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.full(t.shape, math.nan, dtype=dtype or t.dtype)


def _block_lists(c: dict, gen: torch.Generator) -> tuple:
    """Random block lists with an empty list (block 0 of head 0), a full query block row 3
    and an empty row 2 where NQB >= 4, and random partial key_block_valid (block 0 empty)."""
    from attnrt.kernels.block_sparse.reference import block_mask_to_index

    nqb, nkb = -(-c["n"] // c["bq"]), -(-c["m"] // c["bk"])
    mask = torch.rand(c["b"], c["h"], nqb, nkb, generator=gen) < c.get("density", 0.4)
    mask[0, 0, 0] = False
    mask[-1, -1, -1, 0] = True
    mask[0, -1, 0, -1] = True
    if nqb >= 4:
        mask[:, :, 2] = False
        mask[:, :, 3] = True
    idx, cnt = block_mask_to_index(mask)
    valid = None
    if c.get("valid"):
        cap = (c["m"] - torch.arange(nkb) * c["bk"]).clamp(max=c["bk"])
        valid = (torch.rand(nkb, generator=gen) * (cap + 1)).long().clamp(max=cap).int()
        valid[0] = 0
    return mask, idx, cnt, valid


def _transpose(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k2q [B, H, NKB, NQB] (increasing query blocks) and k2q_count [B, H, NKB]."""
    b, h, nqb, nkb = mask.shape
    k2q = torch.zeros(b, h, nkb, nqb, dtype=torch.int32)
    order = torch.arange(nqb).expand(b, h, nkb, nqb)
    keyed = torch.where(mask.transpose(-1, -2), order, nqb + order)
    rows = keyed.sort(-1).values
    count = mask.transpose(-1, -2).sum(-1).int()
    k2q[:] = torch.where(rows < nqb, rows, 0).int()
    return k2q, count


def block_sparse(c: dict) -> dict:
    """The block-sparse Gluon forward (and backward) against block_sparse_attention_reference."""
    from attnrt.kernels.block_sparse import gluon_bwd_sm90 as gb
    from attnrt.kernels.block_sparse import gluon_fwd_sm90 as gf
    from attnrt.kernels.block_sparse.launch import _row_terms
    from attnrt.kernels.block_sparse.reference import block_sparse_attention_reference

    gen = torch.Generator().manual_seed(c["seed"])
    q, k, v = _qkv(c, gen)
    mask, idx, cnt, valid = _block_lists(c, gen)
    bq, bk, scale = c["bq"], c["bk"], c["d"] ** -0.5
    out, lse = _poisoned(q), _poisoned(torch.empty(c["b"], c["h"], c["n"]), torch.float32)
    gf.forward(q, k, v, idx, cnt, valid, bq, bk, scale, out, lse)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = block_sparse_attention_reference(*ref, idx, cnt, block_q=bq, block_k=bk,
                                                    key_block_valid=valid, return_lse=True)
    result = {"out": rel(out, r_out), "nan_left": bool(out.isnan().any() or lse.isnan().any()),
              **_lse_result(lse, r_lse)}
    if c.get("backward"):
        dout = torch.randn(q.shape, generator=gen).to(q.dtype)
        np_rows = -(-c["n"] // bq) * bq
        delta, lse2 = _row_terms(r_out.detach().to(q.dtype), dout, r_lse.detach().float(),
                                 None, np_rows)
        k2q, k2q_count = _transpose(mask)
        dq = torch.zeros(q.shape, dtype=torch.float32)
        dk, dv = _poisoned(k), _poisoned(v)
        gb.backward(q, k, v, dout, lse2, delta, k2q, k2q_count, valid, bq, bk, scale, dq, dk, dv)
        r_dq, r_dk, r_dv = torch.autograd.grad(r_out, ref, dout.double())
        result.update(dq=rel(dq, r_dq), dk=rel(dk, r_dk), dv=rel(dv, r_dv),
                      nan_left=result["nan_left"] or bool(dk.isnan().any() or dv.isnan().any()))
    return result


def _dense_reference(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 softmax attention, bottom-right causal; rows without keys: out 0, lse -inf."""
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, 2) for t in (k, v))
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    if causal:
        n, m = q.shape[1], k.shape[1]
        keep = torch.arange(m).view(1, m) <= torch.arange(n).view(n, 1) + (m - n)
        s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhnm,bmhd->bnhd", p, v), lse


def dense(c: dict) -> dict:
    """The dense Gluon forward (and backward) against float64 softmax attention: known-good
    on the H100, so a failure here means the emulator is wrong."""
    from attnrt.kernels.block_sparse.launch import _row_terms
    from attnrt.kernels.flash import gluon_bwd_sm90 as fb
    from attnrt.kernels.flash import gluon_fwd_sm90 as ff

    gen = torch.Generator().manual_seed(c["seed"])
    q, k, v = _qkv(c, gen)
    scale = c["d"] ** -0.5
    out, lse = _poisoned(q), _poisoned(torch.empty(c["b"], c["h"], c["n"]), torch.float32)
    ff.forward(q, k, v, c["causal"], scale, c.get("block_n", 128), out, lse)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = _dense_reference(*ref, c["causal"], scale)
    result = {"out": rel(out, r_out), "nan_left": bool(out.isnan().any() or lse.isnan().any()),
              **_lse_result(lse, r_lse)}
    if c.get("backward"):
        dout = torch.randn(q.shape, generator=gen).to(q.dtype)
        delta, lse2 = _row_terms(r_out.detach().to(q.dtype), dout, r_lse.detach().float(),
                                 None, -(-c["n"] // 128) * 128)
        dq = torch.zeros(q.shape, dtype=torch.float32)
        dk, dv = _poisoned(k), _poisoned(v)
        fb.backward(q, k, v, dout, lse2, delta, c["causal"], scale, dq, dk, dv)
        r_dq, r_dk, r_dv = torch.autograd.grad(r_out, ref, dout.double())
        result.update(dq=rel(dq, r_dq), dk=rel(dk, r_dk), dv=rel(dv, r_dv),
                      nan_left=result["nan_left"] or bool(dk.isnan().any() or dv.isnan().any()))
    return result


def _engine_case(name: str) -> tuple:
    """(make(backend) -> engine, inputs(b, n, h, d, dtype, device)) of tests.engine.cases'
    case of that name; "plain" / "causal": SoftmaxAttention without / with the causal mask."""
    from tests.engine import cases as engine_cases

    if name not in ("plain", "causal"):
        case = engine_cases.CASES[name]()
        return case.make, case.inputs
    mask_type = "Causal" if name == "causal" else "None"

    def make(backend):
        from attnrt.engine.library import AttentionLibrary

        return AttentionLibrary("SoftmaxAttention", mask_type, head_size=16, backend=backend)

    def inputs(b, n, h, d, dtype, device):
        return (*engine_cases.qkv(b, n, h, d, dtype, device), [], {})

    return make, inputs


def _finals_result(fin: torch.Tensor, finals: dict, shape: tuple[int, int, int]) -> dict:
    """FIN [R, B*H, N] against the reference's final row scales {name: [B, H, N]}."""
    match, err = True, 0.0
    for r, ref in enumerate(finals.values()):
        got, ref = fin[r].view(shape), ref.double()
        match = match and bool(torch.equal(torch.isneginf(got), torch.isneginf(ref)))
        ok = torch.isfinite(ref)
        err = max(err, rel(got[ok], ref[ok]) if ok.any() else 0.0)
    return {"lse_inf_match": match, "lse": err}


def engine(c: dict) -> dict:
    """The engine's generated Gluon forward against the engine's reference backend in float64
    (out and the final row scales, e.g. lse)."""
    from attnrt.engine import gluon_forward, gluon_parts
    from attnrt.engine.call import check_call
    from attnrt.engine.kernel import EngineRun

    gluon_parts.launch = fake.launch
    gluon_forward._device_reason = lambda q: None  # the reasons a GPU call would meet
    make, inputs = _engine_case(c["name"])
    eng = make("triton")
    q, k, v, custom, layout = inputs(c["b"], c["n"], c["h"], c["d"],
                                          getattr(torch, c["dtype"]), "cpu")
    call = check_call(eng._checked, q, k, v, custom, block_size=eng.block_size, **layout)
    ins = [call.inputs[x] for x in eng.variant.input_names]
    run = EngineRun(eng.variant, eng.fns, call, eng._scale(q), ())
    why = gluon_forward.reason(run, q, k, v)
    if why is not None:
        return {"refused": why}
    with torch.no_grad():
        served = gluon_forward._launch(run, gluon_forward.module(run), q, k, v, ins)
    if served is None:
        return {"refused": gluon_forward.last_served()}
    out, fin = served
    custom64 = [x.detach().double() if x.is_floating_point() else x for x in custom]
    r_out, finals = eng.reference(q.double(), k.double(), v.double(), custom64, **layout)
    written = fin[: len(finals)]  # FIN has one (unwritten) row where a variant has no finals
    return {"out": rel(out, r_out), **_finals_result(fin, finals, (c["b"], c["h"], c["n"])),
            "nan_left": bool(out.isnan().any() or written.isnan().any())}


def patch_launches() -> None:
    """The kernels' launch, TMA reduce-add and reinterpret as the emulator's."""
    from attnrt.kernels.block_sparse import gluon_bwd_sm90 as gb
    from attnrt.kernels.block_sparse import gluon_fwd_sm90 as gf
    from attnrt.kernels.flash import gluon_bwd_sm90 as fb
    from attnrt.kernels.flash import gluon_fwd_sm90 as ff

    from . import memory

    for module in (gf, gb, ff, fb):
        module.launch = fake.launch
    for module in (gb, fb):
        module._tma_reduce_add = memory.tma_reduce_add
    gb._view = memory.reinterpret


KINDS = {"block_sparse": block_sparse, "dense": dense, "engine": engine}


def deadlock_selftest(c: dict) -> dict:
    """Two partitions, each waiting for the other's arrival: must end in a Deadlock naming
    both (the runner's own check, with a short GLUON_EMU_TIMEOUT)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    from . import sync

    sync.Launch.reset()
    bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in range(2):
        mbarrier.init(bars.index(i), count=1)

    def first():
        mbarrier.wait(bars.index(0), 0)
        mbarrier.arrive(bars.index(1))

    def second():
        mbarrier.wait(bars.index(1), 0)
        mbarrier.arrive(bars.index(0))

    gl.warp_specialize([(first, ()), (second, ())], [1], [24])
    return {}


KINDS["deadlock_selftest"] = deadlock_selftest
