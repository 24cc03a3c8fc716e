"""q/k/v mods fused into the chunked Triton kernels (fuse_mods="kernel", the default): forward
and backward against the float64 reference engine (eager pre-pass), the fused path proven to
run (the user's mod is never called after construction), and the mods that keep the pre-pass
saying why."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from attnrt.engine.linear import CustomIO, LinearAttentionEngine, meta_tensor
from attnrt.engine.linear_codegen import KERNEL, PRE_PASS, mod_source, plan_mod
from attnrt.kernels.linear.errors import LinearAttentionError, LinearAttentionTypeError
from tests.linear.cases import elu1, head_softmax, log, qkv, rel_l2, relu

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scaled(t: torch.Tensor, io: CustomIO) -> torch.Tensor:
    return t * (1.0 / math.sqrt(t.shape[-1]))


class Counted:
    """A mod that counts its calls after construction (_run resets them): the fused path never
    calls it; the pre-pass once per call."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, t: torch.Tensor, io: CustomIO) -> torch.Tensor:
        self.calls += 1
        return self.fn(t, io)


# name: (mods, decay kind); decay kinds: none, head (RetNet factors [H] through decay_mod=log),
# token ([B, N, H] log-decay), channel ([B, N, H, Dk] log-decay, GLA)
VARIANTS = {
    "retnet": ({"q_mod": scaled, "decay_mod": log}, "head"),
    "gla": ({"q_mod": scaled, "k_mod": elu1}, "channel"),
    "elu1": ({"q_mod": elu1, "k_mod": elu1, "v_mod": elu1}, "none"),
    "elu1_token": ({"q_mod": elu1, "k_mod": elu1}, "token"),
    "relu_channel": ({"q_mod": relu, "k_mod": relu, "v_mod": relu}, "channel"),
    "relu": ({"q_mod": relu, "k_mod": relu, "v_mod": relu}, "none"),
}


def _decay(kind: str, b: int, n: int, h: int, dk: int, gen: torch.Generator):
    if kind == "head":
        return 1 - torch.exp2(-5.0 - torch.arange(h, dtype=torch.float32))
    if kind == "token":
        return F.logsigmoid(torch.randn(b, n, h, generator=gen) + 3)
    if kind == "channel":
        return F.logsigmoid(torch.randn(b, n, h, dk, generator=gen)) / 16
    return None


def _inputs(kind: str, shape: tuple[int, ...], seed: int = 0):
    b, n, h, dk, dv = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = qkv(b, n, h, dk, dv, torch.float32, gen)
    decay = _decay(kind, b, n, h, dk, gen)
    h0 = torch.randn(b, h, dk, dv, generator=gen) * 0.5
    dout = torch.randn(b, n, h, dv, generator=gen)
    dht = torch.randn(b, h, dk, dv, generator=gen)
    return [q, k, v, decay, h0], dout, dht


def _run(mods: dict, tensors, dout, dht, dtype, device, **engine_kwargs):
    """(engine, [out, final state, dq, dk, dv, (ddecay), dh0]) of one call with h0 in and the
    final state out."""
    q, k, v, decay, h0 = (None if t is None else t.to(device) for t in tensors)
    q, k, v = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    h0 = h0.to(acc).detach().requires_grad_()
    if decay is not None:
        decay = decay.to(acc).detach().requires_grad_()
    meta = tuple(meta_tensor(*t.shape, dtype=dtype) for t in (q, k, v))
    engine = LinearAttentionEngine(meta, **mods, **engine_kwargs)
    for fn in mods.values():
        if isinstance(fn, Counted):
            fn.calls = 0
    out, ht = engine(q, k, v, decay, initial_state=h0, output_final_state=True)
    loss = (out.double() * dout.to(device).double()).sum() + (
        ht.double() * dht.to(device).double()).sum()
    leaves = [t for t in (q, k, v, decay, h0) if t is not None]
    return engine, [out, ht, *torch.autograd.grad(loss, leaves)]


def _check_fused(name: str, dtype: torch.dtype, device: str, shape) -> None:
    mods, kind = VARIANTS[name]
    tensors, dout, dht = _inputs(kind, shape)
    counted = {n: Counted(fn) for n, fn in mods.items()}
    engine, got = _run(counted, tensors, dout, dht, dtype, device, backend="triton")
    qkv_mods = tuple(n for n in ("q_mod", "k_mod", "v_mod") if n in mods)
    assert engine.last_fused == qkv_mods
    assert all(engine.mod_paths[n].path == KERNEL for n in qkv_mods)
    assert all(counted[n].calls == 0 for n in qkv_mods), {n: c.calls for n, c in counted.items()}
    if "decay_mod" in counted:
        assert counted["decay_mod"].calls == 1  # decay_mod stays in the pre-pass
    _, want = _run(mods, tensors, dout, dht, torch.float64, "cpu", backend="reference",
                   fuse_mods="eager")
    names = ["out", "final state", "dq", "dk", "dv"] + (["ddecay"] if kind != "none" else [])
    for what, g, w in zip([*names, "dh0"], got, want, strict=True):
        assert g.shape == w.shape, what
        err = rel_l2(g, w)
        assert err < TOL[dtype], f"{name} {what}: rel L2 {err:.2e} >= {TOL[dtype]:.0e}"


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_mods_match_float64_reference(name: str, dtype: torch.dtype) -> None:
    _check_fused(name, dtype, DEVICE, (1, 70, 2, 24, 16))  # Dk=24: padded key columns


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gpu_fused_mods_match_float64_reference(name: str, dtype: torch.dtype) -> None:
    _check_fused(name, dtype, "cuda", (2, 200, 2, 128, 128))


@pytest.mark.interpret
def test_head_softmax_takes_the_prepass_and_says_why() -> None:
    """SLA's feature map (softmax over the head dim) is not element-wise: it runs in the
    pre-pass (called per call) while an element-wise v_mod next to it is fused."""
    q_mod, v_mod = Counted(head_softmax), Counted(relu)
    mods = {"q_mod": q_mod, "k_mod": head_softmax, "v_mod": v_mod}
    tensors, dout, dht = _inputs("token", (1, 40, 2, 16, 16))
    engine, got = _run(mods, tensors, dout, dht, torch.float32, DEVICE, backend="triton")
    plan = engine.mod_paths["q_mod"]
    assert plan.path == PRE_PASS
    assert "softmax" in plan.reason, plan.reason
    assert "q_mod: pre-pass" in engine.explain()
    assert engine.last_fused == ("v_mod",)
    assert (q_mod.calls, v_mod.calls) == (1, 0)
    _, want = _run({"q_mod": head_softmax, "k_mod": head_softmax, "v_mod": relu}, tensors,
                   dout, dht, torch.float64, "cpu", backend="reference")
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert rel_l2(g, w) < 1e-5, i


@pytest.mark.interpret
def test_custom_input_mod_keeps_prepass_and_its_gradient() -> None:
    """A k_mod reading a custom input runs in the pre-pass (its tensor's gradient through
    autograd) beside a fused q_mod."""
    def k_gate(t: torch.Tensor, io: CustomIO) -> torch.Tensor:
        return t * torch.sigmoid(io.input_tensors["gate"])

    gen = torch.Generator().manual_seed(3)
    b, n, h, d = 1, 40, 2, 16
    q, k, v = qkv(b, n, h, d, d, torch.float32, gen)
    gate = torch.randn(h, d, generator=gen)
    dout = torch.randn(b, n, h, d, generator=gen)
    results = []
    for dtype, backend in ((torch.float32, "triton"), (torch.float64, "reference")):
        leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v, gate)]
        meta = tuple(meta_tensor(*t.shape, dtype=dtype) for t in leaves[:3])
        engine = LinearAttentionEngine(meta, q_mod=elu1, k_mod=k_gate,
                                       custom_io=CustomIO({"gate": (h, d)}), backend=backend)
        out = engine(*leaves[:3], None, [leaves[3]])
        grads = torch.autograd.grad((out.double() * dout.double()).sum(), leaves)
        results.append([out, *grads])
        if backend == "triton":
            assert engine.last_fused == ("q_mod",)
            assert "reads custom input 'gate'" in engine.mod_paths["k_mod"].reason
    for i, (g, w) in enumerate(zip(*results, strict=True)):
        assert rel_l2(g, w) < 1e-5, i
    assert results[0][4].abs().sum() > 0  # d(gate) flowed


@pytest.mark.parametrize(("fn", "words"), [
    (lambda t, io: t if t.shape[1] > 4 else -t, "shape[1]"),
    (lambda t, io: torch.add(t, 1.0, alpha=2.0), "differs from the mod"),
    (lambda t, io: t * torch.ones(16), "tensors cannot be captured"),
    (lambda t, io: t > 0, "bool"),
    (lambda t, io: t.float(), "not traceable"),
])
def test_untraceable_mods_keep_the_prepass_with_a_reason(fn, words: str) -> None:
    plan = plan_mod("q_mod", fn, (1, 8, 2, 16))
    assert plan.path == PRE_PASS
    assert words in plan.reason, plan.reason


def test_traced_mod_source_and_derivative() -> None:
    plan = plan_mod("k_mod", elu1, (1, 8, 2, 16))
    assert plan.path == KERNEL
    text = mod_source(plan.expr, plan.grad)
    assert "def mod(x):" in text
    assert "def grad(x):" in text
    assert "tl.exp(x)" in text
    const = plan_mod("v_mod", lambda t, io: t * 3.0, (1, 8, 2, 16))
    assert "3.0 + tl.zeros_like(x)" in mod_source(const.expr, const.grad)


@pytest.mark.parametrize("value", [True, False])
def test_boolean_fuse_mods_refused_with_what_to_write(value: bool) -> None:
    meta = meta_tensor(1, 8, 2, 16, dtype=torch.float32)
    with pytest.raises(LinearAttentionTypeError,
                       match=f"write fuse_mods='{'compile' if value else 'eager'}'"):
        LinearAttentionEngine((meta, meta, meta), q_mod=elu1, fuse_mods=value)
    with pytest.raises(LinearAttentionError, match="fuse_mods='fused' is not allowed"):
        LinearAttentionEngine((meta, meta, meta), q_mod=elu1, fuse_mods="fused")


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"fuse_mods": "eager"}, "fuse_mods='eager'"),
    ({"fuse_mods": "compile"}, "fuse_mods='compile'"),
    ({"backend": "reference"}, "only the Triton kernels fuse"),
    ({"causal": False}, "causal=False"),
])
def test_other_settings_run_mods_in_the_prepass(kwargs: dict, words: str) -> None:
    meta = meta_tensor(1, 8, 2, 16, dtype=torch.float32)
    engine = LinearAttentionEngine((meta, meta, meta), q_mod=elu1, decay_mod=log, **kwargs)
    assert engine.mod_paths["q_mod"].path == PRE_PASS
    assert words in engine.mod_paths["q_mod"].reason
    assert engine.mod_paths["decay_mod"].path == PRE_PASS
    assert "summed within chunks" in engine.mod_paths["decay_mod"].reason


def test_explain_says_where_linear_mods_run() -> None:
    from attnrt.selection.dispatch import explain

    decision = explain(head_size=64, dtype="fp16", causal=True, method="linear")
    assert any("inside its kernels" in n for n in decision.notes), decision.notes
    assert "inside its kernels" in decision.explain()
    dense = explain(head_size=64, dtype="fp16", causal=True)
    assert not any("method linear" in n for n in dense.notes)


@pytest.mark.interpret
def test_local_attention_triton_impl_fuses_scaled_q_mod() -> None:
    """LocalAttention's impl wraps q_mod with its softmax_scale; the wrapper still traces, so
    the layer's mods run inside the kernels too."""
    from attnrt.engine import linear_backends as lb
    from attnrt.kernels.linear.reference import linear_attention_reference

    gen = torch.Generator().manual_seed(5)
    b, n, h, d = 1, 40, 2, 16
    q, k, v = (torch.randn(b, n, h, d, generator=gen) * 0.5 for _ in range(3))
    impl = lb.TritonLinearAttnBackend.get_impl_cls()(h, d, 0.25, True, q_mod=elu1, k_mod=elu1)
    out = impl.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None)
    engine = impl._engine(q.to(DEVICE))
    assert engine.last_fused == ("q_mod", "k_mod")
    want, _ = linear_attention_reference(elu1(q.double(), None) * 0.25,
                                         elu1(k.double(), None), v.double(), None)
    assert rel_l2(out, want) < 1e-5
