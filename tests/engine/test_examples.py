"""The issue's examples, forward and backward: the engine's reference against explicit dense
float64 formulas, and the generated Triton kernels (interpreter on CPU, compiled on the GPU)
against the float64 reference. Kernel outputs and gradients start as NaN (see kernel.py), so
an element a kernel never writes fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TOLERANCE, rel_l2
from tests.engine.cases import CASES, run, run_dense

HAS_CUDA = torch.cuda.is_available()
# Relative L2 bounds: TOLERANCE for outputs; gradients of fp16 runs round P and dS to fp16.
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _check(case, engine, shape, dtype, device):
    q, k, v, custom, layout = case.inputs(*shape, dtype, device)
    out, dout, grads = run(engine, q, k, v, custom, layout, case.grads)
    ref_engine = case.make("reference")
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    c64 = [c.double().cpu() if c.is_floating_point() else c.cpu() for c in custom]
    lay = {key: val.cpu() for key, val in layout.items()}
    ref, _, ref_grads = run(ref_engine, q64, k64, v64, c64, lay, case.grads, dout.double().cpu())
    assert rel_l2(out, ref) < TOLERANCE[dtype]
    for name, g, r in zip(["dq", "dk", "dv", "dcustom"], grads, ref_grads, strict=False):
        assert rel_l2(g, r) < GRAD_TOL[dtype], name


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_explicit_formula(name):
    case = CASES[name]()
    q, k, v, custom, layout = case.inputs(2, 37, 2, 16, torch.float64, "cpu")
    custom = [c.double() if c.is_floating_point() else c for c in custom]
    out, dout, grads = run(case.make("reference"), q, k, v, custom, layout, case.grads,
                           reference=True)
    dense, dense_grads = run_dense(case, q, k, v, custom, layout, dout)
    assert rel_l2(out, dense) < 1e-12
    for g, r in zip(grads, dense_grads, strict=True):
        assert rel_l2(g, r) < 1e-10


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_interpreter_matches_reference(name, dtype, monkeypatch):
    if HAS_CUDA:
        pytest.skip("interpreter cases run where there is no GPU; the gpu cases cover CUDA")
    case = CASES[name]()
    _check(case, case.make("triton"), (2, 37, 2, 16), dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_gpu_matches_reference(name, dtype):
    case = CASES[name]()
    _check(case, case.make("triton"), (2, 333, 4, 64 if name != "relpos_bias" else 64),
           dtype, "cuda")
