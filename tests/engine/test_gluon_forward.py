"""The engine's Gluon sm90 forward (engine/gluon_forward.py): on the GPU every example case
against the float64 reference with the switch on (gradients through the Triton backward) and
its outputs against the Triton forward's; on the CPU the switch, the reasons it does not serve,
the one-warning fallback on a compile failure, the generated text, and (slow) an offline sm90
compile of two variants with the installed Triton.
"""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnrt.engine import gluon_forward
from attnrt.engine.call import check_call
from attnrt.engine.codegen import KernelFlags
from attnrt.engine.gluon_codegen import gluon_source
from attnrt.engine.kernel import EngineRun
from attnrt.engine.library import AttentionLibrary
from tests.conftest import TOLERANCE, rel_l2
from tests.engine.cases import CASES
from tests.engine.test_examples import _check

ROOT = Path(__file__).resolve().parents[2]


SHIPPED = gluon_forward.GLUON_FORWARD  # before any fixture sets it


@pytest.fixture(autouse=True)
def _fresh_switch(monkeypatch):
    monkeypatch.setattr(gluon_forward, "GLUON_FORWARD", False)
    gluon_forward.reset()
    yield
    gluon_forward.reset()


def _run(engine, q, k, v, inputs=None, **layout):
    call = check_call(engine._checked, q, k, v, inputs, block_size=engine.block_size, **layout)
    ins = [call.inputs[n] for n in engine.variant.input_names]
    return EngineRun(engine.variant, engine.fns, call, engine._scale(q), ()), ins


# GPU: every case, both dtypes.
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 333, 4, 64), (2, 256, 2, 128)], ids=["d64", "b2-d128"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gluon_forward_matches_reference(name, dtype, shape):
    case = CASES[name]()
    with gluon_forward.gluon_forward(True):
        _check(case, case.make("triton"), shape, dtype, "cuda")
    served = gluon_forward.last_served()
    if name == "varlen_document":
        assert served.startswith("triton: variable-length")
    else:
        assert served == "gluon"


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(set(CASES) - {"varlen_document"}))
def test_gluon_outputs_and_row_scales_match_triton_forward(name):
    case = CASES[name]()
    engine = case.make("triton")
    q, k, v, custom, layout = case.inputs(1, 300, 2, 128, torch.bfloat16, "cuda")
    run, ins = _run(engine, q, k, v, custom, **layout)
    with gluon_forward.gluon_forward(True):
        out_g, fin_g = run.forward(q, k, v, ins)
    assert gluon_forward.last_served() == "gluon"
    with gluon_forward.gluon_forward(False):
        out_t, fin_t = run.forward(q, k, v, ins)
    assert rel_l2(out_g, out_t) < TOLERANCE[torch.bfloat16]
    rows = len(engine.variant.online.finals)  # none (sigmoid): FIN is a placeholder row
    fin_g, fin_t = fin_g[:rows], fin_t[:rows]
    finite = torch.isfinite(fin_t)
    assert torch.equal(finite, torch.isfinite(fin_g))
    assert rel_l2(fin_g[finite], fin_t[finite]) < 1e-3


# CPU: switch, reasons, fallback, generated text.
def test_switch_ships_on_and_is_scoped():
    """On: 1.09-1.45x the Triton forward for ALiBi, sigmoid and sliding window on an H200,
    0.96x for soft-capping (bench/NOTES-engine.md, thirteenth session)."""
    assert SHIPPED is True
    assert gluon_forward.GLUON_FORWARD is False  # this module's fixture
    assert not gluon_forward.gluon_forward_on()
    with gluon_forward.gluon_forward():
        assert gluon_forward.gluon_forward_on()
        with gluon_forward.gluon_forward(False):
            assert not gluon_forward.gluon_forward_on()
        assert gluon_forward.gluon_forward_on()
    assert not gluon_forward.gluon_forward_on()
    gluon_forward.set_gluon_forward(True)
    assert gluon_forward.gluon_forward_on()


def _engine():
    return AttentionLibrary("AlibiAttention", "None", head_size=64, backend="triton")


def _qkv(b=1, n=64, h=2, d=64, dtype=torch.float16, m=None):
    gen = torch.Generator().manual_seed(3)
    m = m or n
    return (torch.randn(b, n, h, d, generator=gen).to(dtype),
            torch.randn(b, m, h, d, generator=gen).to(dtype),
            torch.randn(b, m, h, d, generator=gen).to(dtype))


def test_off_switch_generates_nothing(monkeypatch):
    monkeypatch.setattr(gluon_forward, "module", lambda run: pytest.fail("generated"))
    q, k, v = _qkv()
    run, ins = _run(_engine(), q, k, v, [torch.rand(2)])
    assert gluon_forward.forward(run, q, k, v, ins) is None


@pytest.mark.parametrize(("change", "expected"), [
    (dict(), "device=cpu"),
    (dict(dtype=torch.float32, cuda=True), "dtype=torch.float32"),
    (dict(d=32, cuda=True), "head sizes D=32"),
    (dict(b=2, n=100, cuda=True), "B=2 with M=100"),
])
def test_reasons(monkeypatch, change, expected):
    if change.pop("cuda", False):
        monkeypatch.setattr(gluon_forward, "_device_reason", lambda q: None)
    q, k, v = _qkv(**change)
    run, ins = _run(_engine(), q, k, v, [torch.rand(2)])
    assert expected in gluon_forward.reason(run, q, k, v)


def test_reasons_layout(monkeypatch):
    monkeypatch.setattr(gluon_forward, "_device_reason", lambda q: None)
    q, k, v = _qkv(n=128)
    run, ins = _run(_engine(), q, k, v, [torch.rand(2)])
    assert gluon_forward.reason(run, q, k, v) is None
    strided = torch.randn(1, 128, 2, 128, dtype=torch.float16)[..., :64]
    assert "cannot be read by TMA" in gluon_forward.reason(run, q, strided, v)
    cu = torch.tensor([0, 50, 128], dtype=torch.int32)
    run, ins = _run(AttentionLibrary("SoftmaxAttention", "Causal", head_size=64,
                                     backend="triton"), q, k, v, cu_len_q=cu, cu_len_kv=cu)
    assert "variable-length" in gluon_forward.reason(run, q, k, v)


def test_reason_block_mask_size(monkeypatch):
    monkeypatch.setattr(gluon_forward, "_device_reason", lambda q: None)
    q, k, v = _qkv(n=256)
    engine = AttentionLibrary("SoftmaxAttention", "None", head_size=64, backend="triton")
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    run, _ = _run(engine, q, k, v, block_sparse_mask=mask)
    assert "block_size=(64, 64) does not tile" in gluon_forward.reason(run, q, k, v)


@pytest.mark.interpret
def test_compile_failure_warns_once_and_triton_serves(monkeypatch, caplog):
    from triton.compiler.errors import CompilationError

    import attnrt.engine as engine_pkg

    class Parts:
        calls = 0

        @staticmethod
        def forward(*args, **kwargs):
            Parts.calls += 1
            raise CompilationError("src", None, "stand-in failure")

    monkeypatch.setattr(gluon_forward, "_device_reason", lambda q: None)
    monkeypatch.setattr(gluon_forward, "module", lambda run: type("M", (), {
        "engine_gluon_fwd": None}))
    monkeypatch.setattr(engine_pkg, "gluon_parts", Parts, raising=False)
    monkeypatch.setitem(sys.modules, "attnrt.engine.gluon_parts", Parts)
    engine = _engine()
    q, k, v = _qkv(n=48)
    slopes = torch.rand(2)
    with caplog.at_level(logging.WARNING, logger="attnrt"), gluon_forward.gluon_forward(True):
        first = engine(q, k, v, [slopes])
        second = engine(q, k, v, [slopes])
    warnings = [r for r in caplog.records if "Gluon forward is off" in r.getMessage()]
    assert len(warnings) == 1
    assert "stand-in failure" in warnings[0].getMessage()
    assert Parts.calls == 1
    assert gluon_forward.last_served().startswith("triton: compiling it failed")
    ref = engine.reference(q.double(), k.double(), v.double(), [slopes.double()])[0]
    assert rel_l2(first, ref) < TOLERANCE[torch.float16]
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", sorted(CASES))
def test_generated_source_is_gluon(name):
    engine = CASES[name]().make("triton")
    for block_n in (64, 128):
        for scaled in (False, True):
            text = gluon_source(engine.variant, KernelFlags(False, scaled, ()), block_n)
            ast.parse(text)
            assert "tl." not in text
            assert "def engine_gluon_fwd(" in text
            assert ("s = s * scale" in text) == scaled
            for input_name in engine.variant.input_names:
                assert f"IN_{input_name}" in text


def test_sigmoid_has_no_row_state_and_no_rescale():
    engine = CASES["sigmoid"]().make("triton")
    text = gluon_source(engine.variant, KernelFlags(False, False, ()), 128)
    assert "o_scale" not in text
    assert "gl.full([HALF]" not in text
    assert "(1.0 / (1.0 + gl.exp(-" in text  # Gluon has no sigmoid


@pytest.mark.slow
def test_offline_sm90_compile_of_two_variants():
    """bench/engine_compile_check.py --gluon-only with the installed Triton: plain softmax and
    the sliding window compile for sm90 (a few seconds each), served by the Gluon forward."""
    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "engine_compile_check.py"),
                           "--gluon-only", "--gluon", "plain,window"], env=env, text=True,
                          capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("gluon ")]
    assert [r[1] for r in rows] == ["plain", "window"]
    assert all(r[2] == "engine_gluon_fwd" for r in rows)
