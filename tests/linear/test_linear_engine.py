"""LinearAttentionEngine on every variant: the Triton backend (interpreter here, the GPU there)
against the same engine in float64 on the reference, forward and backward (dq, dk, dv, ddecay,
custom-input grads); pieces; the recurrent step; non-causal."""

from __future__ import annotations

import pytest
import torch

from attnrt.engine.linear import LinearAttentionEngine, meta_tensor
from tests.linear.cases import CASES, Case, elu1, qkv, rel_l2

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASE_IDS = [c.name for c in CASES]


def _setup(case: Case, dtype, shape=(1, 70, 2, 32, 32), seed=0, device="cpu"):
    b, n, h, dk, dv = shape
    gen = torch.Generator().manual_seed(seed)
    kwargs, decay, custom = case.build(b, n, h, dk, gen)
    tensors = [*qkv(b, n, h, dk, dv, dtype, gen), decay, *custom]
    dout = torch.randn(b, n, h, dv, generator=gen)
    return kwargs, tensors, dout


def _run(kwargs, tensors, dout, dtype, backend, device):
    leaves = [None if t is None else t.to(device).detach().requires_grad_() for t in tensors]
    leaves[:3] = [t.to(dtype).detach().requires_grad_() for t in leaves[:3]]
    if leaves[3] is not None and leaves[3].dtype != dtype and dtype == torch.float64:
        leaves[3] = leaves[3].double().detach().requires_grad_()
    meta = tuple(meta_tensor(*t.shape, dtype=dtype) for t in leaves[:3])
    mod = LinearAttentionEngine(meta, backend=backend, **kwargs)
    custom = [t.double() if dtype == torch.float64 else t for t in leaves[4:]]
    custom = [t.detach().requires_grad_() for t in custom]
    out = mod(*leaves[:4], custom_io=custom)
    grads = torch.autograd.grad((out.double() * dout.to(device).double()).sum(),
                                [t for t in leaves[:4] + custom if t is not None])
    return [out, *grads]


def _compare(case: Case, dtype, backend, device, shape=(1, 70, 2, 32, 32)):
    kwargs, tensors, dout = _setup(case, dtype, shape)
    got = _run(kwargs, tensors, dout, dtype, backend, device)
    want = _run(kwargs, tensors, dout, torch.float64, "reference", "cpu")
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        err = rel_l2(g, w)
        assert err < TOL[dtype], f"{case.name} output/grad #{i}: rel L2 {err:.2e}"


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_backend_matches_float64_reference(case: Case, dtype: torch.dtype) -> None:
    _compare(case, dtype, "triton", DEVICE)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_backend_float32_matches_float64(case: Case) -> None:
    _compare(case, torch.float32, "reference", "cpu", shape=(2, 20, 2, 8, 8))


def test_decay_gradient_reaches_retnet_factors() -> None:
    kwargs, tensors, dout = _setup(CASES[0], torch.float64, (1, 12, 2, 8, 8))
    grads = _run(kwargs, tensors, dout, torch.float64, "reference", "cpu")
    assert grads[4].shape == (2,)  # d(decay) for the [H] factors
    assert grads[4].abs().min() > 0


@pytest.mark.interpret
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_pieces_and_steps_equal_one_pass(backend: str) -> None:
    case = next(c for c in CASES if c.name == "mamba2")
    kwargs, tensors, _ = _setup(case, torch.float32, (1, 40, 2, 16, 16))
    q, k, v, decay, a, dt = tensors
    meta = tuple(meta_tensor(*t.shape, dtype=torch.float32) for t in (q, k, v))
    mod = LinearAttentionEngine(meta, backend=backend, **kwargs)
    whole, state = mod(q, k, v, decay, [a, dt], output_final_state=True)
    cut = 23
    first, mid = mod(q[:, :cut], k[:, :cut], v[:, :cut], decay[:, :cut], [a, dt[:, :cut]],
                     output_final_state=True)
    second, last = mod(q[:, cut:], k[:, cut:], v[:, cut:], decay[:, cut:], [a, dt[:, cut:]],
                       initial_state=mid, output_final_state=True)
    assert rel_l2(torch.cat([first, second], 1), whole) < 1e-5
    assert rel_l2(last, state) < 1e-5
    running = torch.zeros(1, 2, 16, 16)
    for t in range(q.shape[1]):
        tok = slice(t, t + 1)
        o_t, running = mod.step(q[:, tok], k[:, tok], v[:, tok], decay[:, tok], running,
                                [a, dt[:, tok]])
        assert rel_l2(o_t, whole[:, tok]) < 1e-5, f"token {t}"
    assert rel_l2(running, state) < 1e-5


def test_non_causal_engine_matches_dense_product() -> None:
    gen = torch.Generator().manual_seed(9)
    q, k, v = qkv(1, 10, 2, 4, 6, torch.float64, gen)
    meta = tuple(meta_tensor(*t.shape, dtype=torch.float64) for t in (q, k, v))
    mod = LinearAttentionEngine(meta, q_mod=elu1, k_mod=elu1, causal=False)
    out = mod(q, k, v, None)
    fq, fk = elu1(q, None), elu1(k, None)
    want = torch.einsum("bths,bshv->bthv", torch.einsum("bthk,bshk->bths", fq, fk), v)
    torch.testing.assert_close(out, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gpu_triton_backend_matches_float64_reference(case: Case, dtype: torch.dtype) -> None:
    _compare(case, dtype, "triton", "cuda", shape=(2, 130, 2, 64, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gpu_fla_backend_matches_float64_reference(case: Case) -> None:
    pytest.importorskip("fla.ops", reason="fla-core not installed on this GPU machine")
    _compare(case, torch.bfloat16, "fla", "cuda", shape=(2, 130, 2, 64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_mods_equal_eager_mods(device: str) -> None:
    """fuse_mods="compile" runs the same mods through torch.compile: same values and
    gradients."""
    case = next(c for c in CASES if c.name == "mamba2")
    dtype = torch.float64 if device == "cpu" else torch.float32
    kwargs, tensors, dout = _setup(case, dtype, (1, 20, 2, 16, 16))
    backend = "reference" if device == "cpu" else "triton"
    got = _run({**kwargs, "fuse_mods": "compile"}, tensors, dout, dtype, backend, device)
    want = _run({**kwargs, "fuse_mods": "eager"}, tensors, dout, dtype, backend, device)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for g, w in zip(got, want, strict=True):
        assert rel_l2(g, w) < tol
