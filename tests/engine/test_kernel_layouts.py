"""Generated kernels beyond the examples: GQA with Dv != D, block-sparse masks and indices,
skipped blocks, the compiled-module cache, and FlexAttention's forward on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from attnrt.engine import blocks, kernel
from attnrt.engine.library import AttentionLibrary
from attnrt.engine.softmax import AttentionEngine
from tests.conftest import TOLERANCE, rel_l2
from tests.engine.cases import CASES, attend, grid, scores

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
interp = pytest.mark.skipif(HAS_CUDA, reason="interpreter cases; gpu cases cover CUDA")


def _grads(mod, q, k, v, dout, **layout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = mod(q, k, v, **layout)
    return (out, *torch.autograd.grad(out, (q, k, v), dout.to(out.dtype)))


def _compare(triton_mod, ref_mod, q, k, v, dtype, **layout):
    dout = torch.randn(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    got = _grads(triton_mod, q.to(dtype), k.to(dtype), v.to(dtype), dout, **layout)
    lay64 = {key: val.cpu() for key, val in layout.items()}
    want = _grads(ref_mod, q.double().cpu(), k.double().cpu(), v.double().cpu(), dout, **lay64)
    tol = TOLERANCE[dtype] if dtype == torch.float32 else 1e-2
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert rel_l2(g, w) < tol, name


@interp
@pytest.mark.interpret
@pytest.mark.parametrize("attn", ["SoftmaxAttention", "SigmoidAttention"])
def test_gqa_with_value_head_size_unlike_the_query_one(attn):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 35, 4, 16, generator=gen)
    k = torch.randn(1, 29, 2, 16, generator=gen)
    v = torch.randn(1, 29, 2, 24, generator=gen)
    bias = [torch.tensor([-1.0])] if attn == "SigmoidAttention" else []
    mods = [AttentionLibrary(attn, "None", head_size=16, backend=be) for be in ("triton",
                                                                               "reference")]
    _compare(lambda *a, **kw: mods[0](*a, bias, **kw), lambda *a, **kw: mods[1](
        *a, [b.double() for b in bias], **kw), q, k, v, torch.float32)


def _block_inputs():
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=gen) for _ in range(3))
    mask = torch.rand(1, 2, 4, 4, generator=gen) > 0.5
    mask[..., 0] = True  # every query block keeps its first key block
    return q, k, v, mask


@interp
@pytest.mark.interpret
@pytest.mark.parametrize("as_indices", [False, True], ids=["mask", "indices"])
def test_block_sparse_inputs_match_the_block_granular_dense_formula(as_indices):
    q, k, v, mask = _block_inputs()
    mods = [AttentionEngine(None, None, mask_mod=lambda b, h, qi, ki: ki <= qi + 40,
                            backend=be, block_size=(16, 16)) for be in ("triton", "reference")]
    if as_indices:
        num = mask.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        layout = {"block_sparse_indices": idx, "block_num": num}
    else:
        layout = {"block_sparse_mask": mask}
    _compare(mods[0], mods[1], q, k, v, torch.float32, **layout)
    i, j = grid(64, 64)
    keep = mask[:, :, i // 16, j // 16] & (j <= i + 40)
    out = mods[1](q.double(), k.double(), v.double(), **layout)
    assert rel_l2(out, attend(scores(q, k) * 0.25, keep, v)) < 1e-12


@interp
@pytest.mark.interpret
def test_blocks_nobody_keeps_are_never_read():
    q, k, v, mask = _block_inputs()
    mask[..., 2] = False  # key block 2 (keys 32..47) is kept by no query block
    k[:, 32:48], v[:, 32:48] = float("nan"), float("nan")
    mod = AttentionEngine(None, None, backend="triton", block_size=(16, 16))
    out = mod(q, k, v, block_sparse_mask=mask)
    assert torch.isfinite(out).all()


@interp
@pytest.mark.interpret
def test_compiled_modules_are_cached_in_process_and_by_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNRT_CACHE_DIR", str(tmp_path))
    kernel.clear_modules()
    blocks.clear_cache()
    q, k, v = (torch.randn(1, 20, 1, 16) for _ in range(3))
    AttentionLibrary("AlibiAttention", "Causal", head_size=16, backend="triton")(
        q, k, v, [torch.ones(1)])
    files = list((tmp_path / "engine").glob("engine_*.py"))
    assert len(files) == 1
    assert len(kernel._MODULES) == 1
    assert len(blocks._CACHE) == 1
    AttentionLibrary("AlibiAttention", "Causal", head_size=16, backend="triton")(
        q, k, v, [torch.ones(1)])  # a new engine object, the same variant: nothing new
    assert len(kernel._MODULES) == 1
    assert len(blocks._CACHE) == 1
    stamp = files[0].stat().st_mtime_ns
    script = textwrap.dedent("""
        import torch
        from attnrt.engine import kernel
        from attnrt.engine.library import AttentionLibrary
        q, k, v = (torch.randn(1, 20, 1, 16) for _ in range(3))
        AttentionLibrary("AlibiAttention", "Causal", head_size=16, backend="triton")(
            q, k, v, [torch.ones(1)])
        print(list(kernel._MODULES.values())[0].__file__)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", ATTNRT_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    assert done.stdout.strip() == str(files[0])
    assert files[0].stat().st_mtime_ns == stamp  # found, not rewritten


@pytest.mark.parametrize("name", ["alibi", "softcap", "relpos_bias", "sliding_window",
                                  "prefix_lm", "varlen_document", "document_ids"])
def test_flex_forward_matches_the_reference(name):
    case = CASES[name]()
    q, k, v, custom, layout = case.inputs(2, 37, 2, 16, torch.float32, DEVICE)
    with torch.no_grad():
        out = case.make("flex")(q, k, v, custom, **layout)
        ref = case.make("reference")(q.double(), k.double(), v.double(), [
            c.double() if c.is_floating_point() else c for c in custom], **layout)
    assert rel_l2(out, ref) < TOLERANCE[torch.float32]


def test_flex_compiles_again_with_small_tiles_once_the_default_ones_overflow(monkeypatch):
    """Inductor's default tiles overflowed shared memory for relpos_bias with its gradient
    (torch 2.11, H200, D=64): the runner retries once with SMALL_TILES and keeps them; any
    other error, or an overflow with the small tiles, propagates."""
    import torch.nn.attention.flex_attention as fa

    from attnrt.engine import flex

    real, seen = fa.flex_attention, []

    def stand_in(q, k, v, **kwargs):
        seen.append(kwargs.get("kernel_options"))
        if len(seen) == 1:
            raise RuntimeError("No valid triton configs. OutOfMemoryError: out of resource: "
                               "triton_tem Required: 245760 Hardware limit:232448")
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(fa, "flex_attention", stand_in)
    case = CASES["relpos_bias"]()
    q, k, v, custom, layout = case.inputs(1, 40, 2, 16, torch.float32, "cpu")
    engine = case.make("flex")
    out = engine(q, k, v, custom, **layout)
    ref = case.make("reference")(q.double(), k.double(), v.double(),
                                 [c.double() for c in custom], **layout)
    assert rel_l2(out, ref) < TOLERANCE[torch.float32]
    engine(q, k, v, custom, **layout)
    assert seen == [None, flex.SMALL_TILES, flex.SMALL_TILES]
    assert not flex.out_of_shared_memory(RuntimeError("out of resource: registers"))

    def always(q, k, v, **kwargs):
        raise RuntimeError("No valid triton configs. out of resource: Hardware limit:232448")

    monkeypatch.setattr(fa, "flex_attention", always)
    with pytest.raises(RuntimeError, match="Hardware limit"):
        engine(q, k, v, custom, **layout)


def test_a_flex_compile_failure_becomes_kernel_compile_error(
        monkeypatch):
    """Inductor failing to build FlexAttention's kernels (as it did on the H200 for relpos_bias
    with its gradient) reaches the layer as KernelCompileError, which moves it to the next
    ranked implementation, instead of an Inductor traceback."""
    import torch.nn.attention.flex_attention as fa
    from torch._inductor.exc import InductorError

    from attnrt.engine.backends import FlexEngineImpl
    from attnrt.errors import KernelCompileError

    def fails(q, k, v, **kwargs):
        raise InductorError(RuntimeError("No valid triton configs. PTXASError"), None)

    monkeypatch.setattr(fa, "flex_attention", fails)
    impl = FlexEngineImpl(2, 16, None, score_mod=lambda s, io, b, h, qi, ki: s * 0.5)
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(KernelCompileError, match="compiling FlexAttention failed"):
        impl.forward(q, q, q, None)

    def user_error(q, k, v, **kwargs):
        raise ValueError("not a compile failure")

    monkeypatch.setattr(fa, "flex_attention", user_error)
    with pytest.raises(ValueError, match="not a compile failure"):
        impl.forward(q, q, q, None)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["alibi", "softcap", "relpos_bias", "sliding_window",
                                  "varlen_document"])
def test_flex_forward_and_backward_on_gpu(name):
    from tests.engine.cases import run

    case = CASES[name]()
    q, k, v, custom, layout = case.inputs(2, 300, 4, 64, torch.bfloat16, "cuda")
    out, dout, grads = run(case.make("flex"), q, k, v, custom, layout, case.grads)
    c64 = [c.double().cpu() if c.is_floating_point() else c.cpu() for c in custom]
    lay = {key: val.cpu() for key, val in layout.items()}
    ref, _, ref_grads = run(case.make("reference"), q.double().cpu(), k.double().cpu(),
                            v.double().cpu(), c64, lay, case.grads, dout.double().cpu())
    assert rel_l2(out, ref) < TOLERANCE[torch.bfloat16]
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_l2(g, r) < 3e-2


@pytest.mark.gpu
def test_long_sliding_window_on_gpu_skips_blocks_and_matches():
    blocks.clear_cache()
    q, k, v = (torch.randn(1, 2048, 4, 64, device="cuda", dtype=torch.float16)
               for _ in range(3))
    mods = [AttentionLibrary("SoftmaxAttention", "SlidingWindow", head_size=64, window=256,
                             backend=be) for be in ("triton", "reference")]
    out = mods[0](q, k, v)
    ref = mods[1](q.double(), k.double(), v.double())
    assert rel_l2(out, ref) < TOLERANCE[torch.float16]
    classes = next(iter(blocks._CACHE.values()))[0][1]  # fwd lists' full counts
    assert int(classes.sum()) < (2048 // 128) * (2048 // 64) // 4


def _int_ops_engine(backend):
    from attnrt.engine.spec import CustomIO

    def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        bucket = (q_idx - kv_idx) // 4 + 20  # floor division of negative numbers
        phase = (q_idx - kv_idx) % 3
        return score * 0.25 + custom_fwd_inputs["bias"][h, bucket] - 0.1 * phase \
            + torch.where(kv_idx > q_idx, -0.5, 0.25) + torch.clamp(score, max=1.0) * 0.1

    return AttentionEngine(None, score_mod, CustomIO({"bias": ("heads", 41)}), backend=backend)


@pytest.mark.parametrize("backend", [
    pytest.param("triton", marks=[pytest.mark.interpret] if not HAS_CUDA else []), "flex"])
def test_integer_floor_division_and_modulo_follow_python(backend):
    gen = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(1, 70, 2, 16, generator=gen).to(DEVICE) for _ in range(3))
    bias = torch.randn(2, 41, generator=gen).to(DEVICE)
    with torch.no_grad():
        out = _int_ops_engine(backend)(q, k, v, [bias])
        ref = _int_ops_engine("reference")(q.double(), k.double(), v.double(), [bias.double()])
    assert rel_l2(out, ref) < TOLERANCE[torch.float32]
    i, j = grid(70, 70)
    s = scores(q.cpu(), k.cpu()) * 0.25
    dense = s + bias.double().cpu()[:, torch.div(i - j, 4, rounding_mode="floor") + 20] \
        - 0.1 * torch.remainder(i - j, 3).double() + torch.where(j > i, -0.5, 0.25) \
        + torch.clamp(scores(q.cpu(), k.cpu()), max=1.0) * 0.1
    assert rel_l2(ref, attend(dense, None, v.cpu())) < 1e-12


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="the gpu cases compile for the real device")
def test_generated_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler may refuse: compile for sm90 with Triton's
    bundled ptxas in a process without TRITON_INTERPRET (all cases: python -m
    tests.engine.compile_check 90)."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-m", "tests.engine.compile_check",
                           "90", "alibi", "varlen_document", "retention"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled fwd, dkdv, dq for sm90") == 3


@pytest.mark.parametrize("backend", [
    pytest.param("triton", marks=[pytest.mark.interpret] if not HAS_CUDA else []),
    "reference"])
def test_rows_that_keep_no_key_output_zero_with_zero_gradients(backend):
    mod = AttentionEngine(None, None, mask_mod=lambda b, h, qi, ki: (ki < 8) & (qi >= 16),
                          backend=backend)
    q, k, v = (torch.randn(1, 40, 2, 16, device=DEVICE).requires_grad_() for _ in range(3))
    out = mod(q, k, v)
    out.backward(torch.ones_like(out))
    assert torch.equal(out[:, :16], torch.zeros_like(out[:, :16]))
    assert torch.isfinite(out).all()
    assert torch.equal(q.grad[:, :16], torch.zeros_like(q.grad[:, :16]))
    assert torch.equal(k.grad[:, 8:], torch.zeros_like(k.grad[:, 8:]))
    i, j = grid(40, 40)
    want = attend(scores(q.detach().cpu(), k.detach().cpu()) * 0.25, (j < 8) & (i >= 16),
                  v.detach().cpu())
    assert rel_l2(out, want) < TOLERANCE[torch.float32]


def test_cuda_tiles_are_the_table_s_unless_a_block_mask_sets_the_granularity():
    """Without a block-sparse mask the tiles are the table's (128-row forward); a mask's
    block size cuts them, and a 64-row tile runs one warpgroup (4 warps): the H100 run that
    found (64, 64) tiles with 8 warps at 177 TFLOP/s is in bench/NOTES-engine.md. dK/dV
    walks 32 rows per step (no register spills on sm90, bench/engine_compile_check.py)."""
    assert kernel.pick_tiles("cuda", 128, 128, None, "fwd") == kernel.Tiles(128, 64, 8, 3)
    assert kernel.pick_tiles("cuda", 128, 128, None, "dkdv") == kernel.Tiles(32, 128, 8, 2)
    assert kernel.pick_tiles("cuda", 128, 128, (64, 64), "fwd") == kernel.Tiles(64, 64, 4, 3)
    assert kernel.pick_tiles("cuda", 128, 128, (64, 64), "dkdv") == kernel.Tiles(32, 64, 4, 2)
    assert kernel.pick_tiles("cuda", 256, 256, None, "fwd") == kernel.Tiles(64, 64, 4, 2)
    assert kernel.pick_tiles("cpu", 128, 128, None, "fwd") == kernel.Tiles(16, 16, 4, 1)
    with pytest.raises(Exception, match=r"block_size=\(8, 64\) must be multiples of 16"):
        kernel.pick_tiles("cuda", 128, 128, (8, 64), "fwd")


@pytest.mark.interpret
@pytest.mark.parametrize("window", [None, 40])
def test_tiles_wider_than_the_call_block_size_match_the_reference(monkeypatch, window):
    """With no block mask, tiles need not divide the call's block_size (64, 64): the mask_mod's
    lists are built at the tiles' own granularity. Forced 128 x 64 / 64 x 128 tiles under the
    interpreter, forward and backward, against the reference."""
    from attnrt.engine.library import sliding_window_mask

    table = {"fwd": (128, 64), "dq": (128, 64), "dkdv": (64, 128)}
    monkeypatch.setattr(kernel, "pick_tiles", lambda device, d, dv, block_size, name:
                        kernel.Tiles(*table[name], 4, 1))
    mask = None if window is None else sliding_window_mask(window)
    ours = AttentionEngine(None, None, mask_mod=mask, backend="triton")
    ref = AttentionEngine(None, None, mask_mod=mask, backend="reference")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 200, 2, 32, generator=gen, requires_grad=True) for _ in range(3))
    out, want = ours(q, k, v), ref(q, k, v)
    do = torch.randn(out.shape, generator=gen)
    assert rel_l2(out, want) < TOLERANCE[torch.float32]
    for got, expect in zip(torch.autograd.grad(out, (q, k, v), do),
                           torch.autograd.grad(want, (q, k, v), do), strict=True):
        assert rel_l2(got, expect) < TOLERANCE[torch.float32]


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["relpos_bias", "document_ids", "alibi"])
@pytest.mark.parametrize("keys_first", [True, False], ids=["keys_x_rows", "rows_x_keys"])
def test_dkdv_in_either_block_orientation_matches_the_reference(monkeypatch, name, keys_first):
    """dK/dV computes its blocks as [keys, rows] where every backward expression is element-
    wise (codegen_bwd.transposed), else as [rows, keys]: both orientations, with a custom-input
    gradient (relpos_bias), a mask reading a custom input and an index-dependent score, under
    the interpreter against the float64 reference."""
    from attnrt.engine import codegen_bwd
    from tests.engine.test_examples import _check

    monkeypatch.setattr(codegen_bwd, "transposed", lambda variant: keys_first)
    kernel.clear_modules()
    case = CASES[name]()
    try:
        _check(case, case.make("triton"), (1, 37, 2, 16), torch.float32, "cpu")
    finally:
        kernel.clear_modules()


def test_dkdv_orientation_is_keys_first_unless_a_backward_expression_reduces():
    """The shipped variants have element-wise backward expressions; a reduction over the keys
    (read from a traced tree) keeps [rows, keys]."""
    from attnrt.engine import codegen_bwd
    from attnrt.engine.trace import leaf, make

    for name in CASES:
        assert codegen_bwd.transposed(CASES[name]().make("triton").variant), name
    assert codegen_bwd._reduces(make("add", leaf("score"), make("reduce_max", leaf("score"))))
    assert not codegen_bwd._reduces(make("exp", leaf("score")))


def _row_and_key_inputs(backend: str) -> AttentionEngine:
    """A score_mod reading one custom input per row (a multiplicative scale: its gradient is
    a sum over keys) and one per key (an additive bias: a sum over rows)."""
    from attnrt.engine.spec import CustomIO

    def scaled_biased(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        return (score * 0.25 * custom_fwd_inputs["row_scale"][h, q_idx]
                + custom_fwd_inputs["key_bias"][h, kv_idx])

    inputs = CustomIO({"row_scale": ("heads", "seq_len"), "key_bias": ("heads", "seq_len")})
    return AttentionEngine(None, scaled_biased, inputs, backend=backend)


@pytest.mark.interpret
@pytest.mark.parametrize("keys_first", [True, False], ids=["keys_x_rows", "rows_x_keys"])
def test_per_row_and_per_key_input_gradients_in_either_orientation(monkeypatch, keys_first):
    """The dK/dV kernel's atomics sum a per-row input's gradient over the keys and a per-key
    input's over the rows, in either block orientation (interpreter, against the float64
    reference)."""
    from attnrt.engine import codegen_bwd

    monkeypatch.setattr(codegen_bwd, "transposed", lambda variant: keys_first)
    kernel.clear_modules()
    gen = torch.Generator().manual_seed(5)
    n, h = 45, 2
    q, k, v = (torch.randn(1, n, h, 16, generator=gen) for _ in range(3))
    scale = (0.5 + torch.rand(h, n, generator=gen))
    bias = torch.randn(h, n, generator=gen)
    do = torch.randn(1, n, h, 16, generator=gen)
    results = []
    try:
        for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
            leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, scale, bias)]
            out = _row_and_key_inputs(backend)(*leaves[:3], leaves[3:])
            results.append((out, torch.autograd.grad(out, leaves, do.to(dtype))))
    finally:
        kernel.clear_modules()
    (out, grads), (want, want_grads) = results
    assert rel_l2(out, want) < TOLERANCE[torch.float32]
    for name, got, expect in zip(("dq", "dk", "dv", "drow_scale", "dkey_bias"), grads,
                                 want_grads, strict=True):
        assert rel_l2(got, expect) < 2e-5, name
