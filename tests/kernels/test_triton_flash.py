"""TRITON_FLASH_ATTN against its float64 reference: values, lse, gradients, refusals.

Interpreter cases (CPU, TRITON_INTERPRET=1 from tests/conftest.py) use tiny fp16/fp32 shapes:
bf16 dots are wrong under the interpreter, which has no numpy bf16. GPU cases use the shipped
sm90/sm80 configs, so a config that cannot compile fails here.
"""

from __future__ import annotations

import pytest
import torch

from attnrt.kernels import fast_launch
from attnrt.kernels.flash import gluon_paths
from attnrt.kernels.flash import launch as tf
from attnrt.kernels.flash.configs_cuda import CONFIGS, select_config

# Relative L2 error bounds against float64. float32 is exact-ish (ieee dots, fp32 softmax);
# fp16/bf16 are dominated by rounding P to the input dtype before the P @ V product.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every kernel output starts as NaN, so an element the kernel never wrote fails the test."""
    made: list[torch.Tensor] = []

    def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = torch.full(shape, float("nan"), dtype=dtype, device=device)
        made.append(t)
        return t

    monkeypatch.setattr(tf, "_alloc", alloc)
    return made


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    # The floor of 1 keeps an exactly-zero reference (dq, dk when M == 1) from dividing by 0;
    # every other reference here has a norm well above 1.
    return ((a.double() - b.double()).norm() / max(b.double().norm().item(), 1.0)).item()


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str = DEVICE) -> tuple:
    b, n, m, h, hkv, d = shape
    q = torch.randn(b, n, h, d, dtype=dtype, device=device)
    k = torch.randn(b, m, hkv, d, dtype=dtype, device=device)
    v = torch.randn(b, m, hkv, d, dtype=dtype, device=device)
    return q, k, v


def _run(q, k, v, causal, config=None, scale=None):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = tf.flash_attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=True,
                                  config=config)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out, lse, *grads), dout


def _reference(q, k, v, causal, dout, scale=None):
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    out, lse = tf.flash_attention_reference(q, k, v, causal=causal, softmax_scale=scale,
                                            return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), dout.cpu().double())
    return (out, lse, *grads)


def _check_parity(shape, dtype, causal, config=None, scale=None) -> None:
    q, k, v = _inputs(shape, dtype)
    got, dout = _run(q, k, v, causal, config, scale)
    _compare(got, _reference(q, k, v, causal, dout, scale), dtype)


def _compare(got, want, dtype) -> None:
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape, name
        g = g.cpu()
        if name == "lse":
            # -inf marks causal rows that see no key (N > M); it must match exactly.
            empty = torch.isinf(w)
            assert torch.equal(torch.isinf(g), empty), "lse -inf rows"
            g, w = g[~empty], w[~empty]
        assert torch.isfinite(g).all(), f"{name} has unwritten or non-finite elements"
        err = _rel(g, w)
        assert err < TOL[dtype], f"{name}: relative L2 error {err:.2e} >= {TOL[dtype]:.0e}"


# (B, N, M, H, Hkv, D): odd lengths hit the tail masks, N > M gives fully masked causal rows.
INTERP_CASES = [
    ((1, 17, 17, 2, 2, 32), torch.float32),
    ((1, 1, 20, 4, 2, 72), torch.float32),
    ((2, 9, 33, 4, 1, 80), torch.float32),
    ((1, 19, 7, 4, 2, 128), torch.float32),
    ((1, 40, 70, 4, 2, 64), torch.float16),
    ((1, 33, 20, 2, 1, 80), torch.float16),
    ((2, 21, 13, 3, 1, 72), torch.float16),  # strides 8 mod 16: the kernels run with UNIT=8
    ((1, 1, 1, 1, 1, 32), torch.float16),
]


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("shape", "dtype"), INTERP_CASES,
                         ids=lambda x: str(x).replace(" ", "").replace("torch.", ""))
def test_parity_interpreter(shape, dtype, causal):
    _check_parity(shape, dtype, causal)


def test_stride_unit_is_what_every_stride_divides_by():
    def t(*shape, dtype=torch.float16):
        return torch.empty(shape, dtype=dtype)

    assert tf._stride_unit(t(1, 21, 3, 72), t(1, 13, 1, 72)) == 8  # head stride 72 = 8 mod 16
    assert tf._stride_unit(t(1, 20, 4, 72, dtype=torch.float32)) == 4  # 16 bytes of float32
    assert tf._stride_unit(t(2, 16, 4, 64), t(2, 16, 4, 128)) == 1  # all divide by 16 already
    qkv = t(1, 9, 3, 3, 72)  # packed: strides 5832, 648, 216, all 8 mod 16
    assert tf._stride_unit(*qkv.unbind(3)) == 8
    assert tf._stride_unit(t(1, 9, 3, 76)[..., :72]) == 1  # head stride 76: not 16 bytes
    huge = torch.empty(144, dtype=torch.float16).as_strided((1, 2, 1, 72), (2**31 + 8, 72, 72, 1))
    assert tf._stride_unit(huge) == 1  # a stride the kernel would multiply past int32
    assert tf._strides(t(1, 21, 3, 72), 8) == (21 * 3 * 9, 27, 9, 1)


@pytest.mark.interpret
def test_noncontiguous_inputs_and_custom_scale():
    # q as a transposed [B, H, N, D] buffer, k/v as slices of a wider one: strides, not copies.
    q = torch.randn(1, 4, 13, 40, dtype=torch.float32).transpose(1, 2)
    kv = torch.randn(1, 11, 2, 2, 40, dtype=torch.float32)
    k, v = kv[:, :, :, 0], kv[:, :, :, 1]
    got, dout = _run(q, k, v, causal=True, scale=0.3)
    _compare(got, _reference(q, k, v, True, dout, scale=0.3), torch.float32)


@pytest.mark.interpret
def test_forward_plans_are_reused_only_for_their_own_key():
    """A forward plan (grid, strides, head group, constexprs) is kept per shape, strides, causal
    flag and config entry: the same shape with other strides, mask or blocks gets its own, and
    each call, the repeats too, matches float64 (a stale plan would read wrong strides)."""
    q, k, v = _inputs((1, 17, 23, 4, 2, 32), torch.float32)
    q_heads_first = q.transpose(1, 2).contiguous().transpose(1, 2)  # same shape, other strides
    small = {"fwd": {"BLOCK_M": 16, "BLOCK_N": 16}}
    calls = [(q, False, None), (q_heads_first, False, None), (q, True, None), (q, False, small)]
    for query, causal, config in calls * 2:
        out = tf.flash_attention(query, k, v, causal=causal, config=config)
        want = tf.flash_attention_reference(query.double(), k.double(), v.double(), causal=causal)
        assert _rel(out, want) < TOL[torch.float32]
    assert len(tf._PLANS) == len(calls)


@pytest.mark.interpret
def test_lse_gradient_flows():
    q, k, v = (t.requires_grad_() for t in _inputs((1, 9, 12, 2, 1, 32), torch.float32))
    _, lse = tf.flash_attention(q, k, v, causal=True, return_lse=True)
    got = torch.autograd.grad(lse.sum(), (q, k))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    _, lse64 = tf.flash_attention_reference(q64, k64, v64, causal=True, return_lse=True)
    want = torch.autograd.grad(lse64.sum(), (q64, k64))
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) < TOL[torch.float32]


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_config_override_gives_same_result(causal):
    # 16-row blocks: several unmasked and masked key blocks per query block.
    cfg = {"fwd": {"BLOCK_M": 16, "BLOCK_N": 16},
           "bwd_dkdv": {"BLOCK_M": 16, "BLOCK_N": 16}, "bwd_dq": {"BLOCK_M": 16, "BLOCK_N": 16}}
    _check_parity((1, 21, 57, 2, 1, 32), torch.float32, causal=causal, config=cfg)


@pytest.mark.interpret
def test_gluon_switches_off_the_gpu_run_the_triton_kernels(monkeypatch):
    """The Gluon forward and backward are for sm90 tensors: on CPU tensors the switches are
    never consulted, and the Triton kernels give the reference result."""
    def unexpected(kind: str) -> None:
        raise AssertionError(f"the Gluon {kind} was looked up for CPU tensors")

    monkeypatch.setattr(gluon_paths, "module", unexpected)
    cfg = {"fwd": {"BLOCK_M": 16, "BLOCK_N": 64, "gluon": 1},
           "bwd_dkdv": {"BLOCK_M": 16, "BLOCK_N": 16, "gluon": 1}}
    _check_parity((1, 21, 70, 2, 1, 32), torch.float32, causal=True, config=cfg)


def test_autotune_candidates_start_with_the_shipped_forward():
    """Tuning may only beat the shipped forward, never lose a switch of it (e.g. gluon)."""
    from attnrt.kernels.flash.configs import make_entry
    from attnrt.kernels.flash.configs_cuda import FWD_CANDIDATES

    for arch, buckets in FWD_CANDIDATES.items():
        for bucket, candidates in buckets.items():
            assert make_entry(candidates[0]) == select_config(arch, bucket)["fwd"], (arch, bucket)


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_gluon_module_that_does_not_import_turns_the_path_off(monkeypatch, caplog, kind):
    import sys

    monkeypatch.setattr(gluon_paths.SWITCH, "loaded", {})
    name = gluon_paths.SWITCH.modules[kind]
    monkeypatch.setitem(sys.modules, f"attnrt.kernels.flash.{name}", None)  # import fails
    with caplog.at_level("WARNING", logger="attnrt"):
        assert gluon_paths.module(kind) is None
        assert gluon_paths.module(kind) is None  # looked up once, said once
    assert [r.getMessage() for r in caplog.records if f"Gluon {kind} is off" in r.getMessage()]
    assert len(caplog.records) == 1


def _failing_gluon(error: BaseException):
    from types import SimpleNamespace

    def run(*args: object) -> None:
        raise error
    return SimpleNamespace(usable=lambda *args: True, forward=run, backward=run)


def test_gluon_compile_failure_turns_the_gluon_path_off(monkeypatch, caplog):
    """A Gluon compile error: one warning, that Gluon kernel off for the process, and the
    caller told to run its Triton kernels (False); only compile errors are caught."""
    from types import SimpleNamespace

    from triton.compiler.errors import CompilationError

    # Only is_cuda (and, for the dQ buffer, shape and device) is read before the module's calls.
    cuda_q = SimpleNamespace(is_cuda=True, shape=(1, 1, 1, 1), device="cpu")
    grads = (None, None, None)
    calls = {
        "forward": lambda: gluon_paths.forward(cuda_q, None, None, False, 1.0,
                                               {"BLOCK_N": 128, "gluon": 1}, None, None, 1),
        "backward": lambda: gluon_paths.backward(cuda_q, None, None, None, None, None, False,
                                                 1.0, {"gluon": 1}, grads, 1),
    }
    for kind, call in calls.items():
        monkeypatch.setattr(gluon_paths.SWITCH, "loaded",
                            {kind: _failing_gluon(RuntimeError("CUDA error: illegal access"))})
        with pytest.raises(RuntimeError, match="illegal access"):
            call()
        monkeypatch.setattr(gluon_paths.SWITCH, "loaded",
                            {kind: _failing_gluon(CompilationError(None, None, "simulated"))})
        caplog.clear()
        with caplog.at_level("WARNING", logger="attnrt"):
            assert call() is False
        assert gluon_paths.SWITCH.loaded[kind] is None
        assert any(f"Gluon {kind} is off" in r.getMessage() and "compiling it failed"
                   in r.getMessage() for r in caplog.records)
        assert call() is False


def test_gluon_backward_stays_off_under_deterministic_algorithms(monkeypatch):
    from types import SimpleNamespace

    def unexpected(kind: str) -> None:
        raise AssertionError("the Gluon backward was looked up under deterministic algorithms")

    monkeypatch.setattr(gluon_paths, "module", unexpected)
    monkeypatch.setattr(gluon_paths.torch, "are_deterministic_algorithms_enabled", lambda: True)
    cuda_q = SimpleNamespace(is_cuda=True)
    assert gluon_paths.backward(cuda_q, None, None, None, None, None, False, 1.0,
                                {"gluon": 1}, (None, None, None), 1) is False


@pytest.mark.interpret
def test_deterministic():
    q, k, v = _inputs((1, 24, 40, 4, 1, 32), torch.float16)
    dout = torch.randn(1, 24, 4, 32, dtype=torch.float16)
    runs = []
    for _ in range(2):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out, lse = tf.flash_attention(qq, kk, vv, causal=True, return_lse=True)
        runs.append((out, lse, *torch.autograd.grad(out, (qq, kk, vv), dout)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def _bad(**change) -> dict:
    q, k, v = _inputs((1, 8, 8, 4, 2, 32), torch.float16, "cpu")
    args = {"q": q, "k": k, "v": v}
    for name, fn in change.items():
        args[name] = fn(args[name]) if callable(fn) else fn
    return args


class TestRefusals:
    """Each declared limit: the request is refused and the message names the argument."""

    @pytest.mark.parametrize(("args", "exc", "needle"), [
        (_bad(q=lambda t: t[0]), ValueError, "q.ndim=3"),
        (_bad(q=lambda t: t[..., :20], k=lambda t: t[..., :20], v=lambda t: t[..., :20]),
         ValueError, "head_size=20 is not supported by TRITON_FLASH_ATTN"),
        (_bad(k=lambda t: t[:, :, :1].expand(1, 8, 3, 32), v=lambda t: t[:, :, :1]
              .expand(1, 8, 3, 32)), ValueError, "num_kv_heads=3"),
        (_bad(k=lambda t: t.float()), TypeError, "k.dtype=torch.float32"),
        (_bad(q=lambda t: t.to(torch.int32)), TypeError, "q.dtype=torch.int32"),
        (_bad(v=lambda t: t[:, :4]), ValueError, "v.shape=(1, 4, 2, 32)"),
        (_bad(q="not a tensor"), TypeError, "q=str"),
        (_bad(q=lambda t: t[:, :0]), ValueError, "q.shape=(1, 0, 4, 32)"),
    ], ids=["ndim", "head_size", "heads", "dtype_mismatch", "int_dtype", "kv_shape", "type",
            "empty"])
    def test_refused(self, args, exc, needle):
        with pytest.raises(exc, match=needle.replace("(", r"\(").replace(")", r"\)")):
            tf.flash_attention(**args)

    def test_bad_scale(self):
        with pytest.raises(ValueError, match="softmax_scale=-1.0"):
            tf.flash_attention(**_bad(), softmax_scale=-1.0)

    def test_bad_config(self):
        for bad in ({"BLOCK_M": 48}, {"num_stages": 0}, {"BLOCK_N": 8}, {"warps": 4},
                    {"gluon": 2}):
            with pytest.raises(ValueError, match=r"config\['fwd'\]"):
                tf.flash_attention(**_bad(), config={"fwd": bad})
        with pytest.raises(ValueError, match="gluon takes BLOCK_N 64 or 128, got 32"):
            tf.flash_attention(**_bad(), config={"fwd": {"BLOCK_N": 32, "gluon": 1}})

    @pytest.mark.gpu  # needs a second device kind to mismatch
    def test_device_mismatch(self):
        args = _bad()
        args = {"q": args["q"].cuda(), "k": args["k"], "v": args["v"].cuda()}
        with pytest.raises(ValueError, match="k.device=cpu"):
            tf.flash_attention(**args)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_shipped_configs_are_accepted(arch, causal):
    for bucket in CONFIGS[arch]:
        cfg = select_config(arch, bucket)
        want = {kernel: {**base, **cfg.get(f"{kernel}_causal" if causal else kernel,
                                           cfg.get(kernel, {}))}
                for kernel, base in tf.DEFAULT_CONFIG.items()}
        assert tf._resolve_config(cfg, causal) == want


def test_declared_capabilities():
    assert (torch.float16, torch.bfloat16, torch.float32) == tf.SUPPORTED_DTYPES
    assert {32, 64, 72, 80, 96, 128, 160, 192, 256} <= set(tf.HEAD_SIZES)
    assert all(d % 8 == 0 and 32 <= d <= 256 for d in tf.HEAD_SIZES)


# ----------------------------------------------------------------------------- GPU


def _gpu_config(dtype: torch.dtype, head_size: int) -> dict:
    major, minor = torch.cuda.get_device_capability()
    return select_config(f"sm{major}{minor}", head_size, sixteen_bit=dtype != torch.float32)


GPU_HEAD_SIZES = [32, 40, 64, 72, 80, 96, 128, 160, 192, 256]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", GPU_HEAD_SIZES, ids=lambda d: f"h{d}")
def test_gpu_head_sizes(d, dtype):
    _check_parity((2, 257, 257, 4, 2, d), dtype, True, _gpu_config(dtype, d))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(1, 1, 300, 4, 1, 128), (2, 500, 257, 8, 2, 128),
                                   (1, 257, 1029, 4, 4, 64), (1, 1024, 1024, 6, 3, 128)],
                         ids=["n1", "n_gt_m", "n_lt_m", "n1024"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_shapes(shape, dtype, causal):
    _check_parity(shape, dtype, causal, _gpu_config(dtype, shape[-1]))


@pytest.mark.gpu
@pytest.mark.parametrize("switch", ["tma", "warp_specialize", "gluon"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_forward_switches(switch, causal):
    # B=2, GQA and M not a multiple of BLOCK_N: TMA row/column offsets and the masked tail.
    cfg = _gpu_config(torch.bfloat16, 128)
    cfg["fwd"] = {**cfg["fwd"], "gluon": 0, switch: 1}
    _check_parity((2, 1000, 1000, 4, 2, 128), torch.bfloat16, causal, cfg)


def _gluon_calls(monkeypatch: pytest.MonkeyPatch, kind: str = "forward") -> list[int]:
    """Counts the Gluon kernel's launches (fails the test where this Triton has no Gluon)."""
    gluon = gluon_paths.module(kind)
    assert gluon is not None, f"the GPU machine's Triton should import the Gluon {kind}"
    calls: list[int] = []
    real = getattr(gluon, kind)
    monkeypatch.setattr(gluon, kind, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9,
                    reason="the Gluon forward is built for sm90")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("shape", "block_n"), [
    # B > 1 only with M a multiple of BLOCK_N (usable() leaves the rest to Triton)
    ((2, 1000, 1024, 6, 3, 128), 128), ((1, 700, 513, 4, 4, 128), 64),
    ((1, 1, 300, 4, 1, 128), 128), ((2, 777, 768, 4, 2, 64), 64), ((1, 300, 200, 2, 1, 64), 128)],
    ids=["gqa_m_gt_n", "n_gt_m_bn64", "n1", "d64", "d64_n_gt_m"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_gluon_forward(shape, block_n, dtype, causal, monkeypatch):
    """The Gluon ping-pong forward (out and lse; gradients from the Triton backward on its
    output) against float64, NaN-poisoned outputs, and that it really ran."""
    calls = _gluon_calls(monkeypatch)
    cfg = _gpu_config(dtype, shape[-1])
    cfg["fwd"] = {**cfg["fwd"], "BLOCK_N": block_n, "gluon": 1}
    cfg.pop("fwd_causal", None)
    _check_parity(shape, dtype, causal, cfg)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9,
                    reason="the Gluon forward is built for sm90")
@pytest.mark.parametrize("group", [1, 5], ids=lambda g: f"group{g}")
@pytest.mark.parametrize("gluon", [0, 1], ids=["triton", "gluon"])
def test_gpu_forward_head_groups(group, gluon, monkeypatch):
    # 12 heads in groups of 1 and of 5 (a short last group), causal: every tile written once.
    calls = _gluon_calls(monkeypatch)
    monkeypatch.setattr(tf, "head_group", lambda q, k, causal: group)
    cfg = _gpu_config(torch.bfloat16, 128)
    cfg["fwd"] = {**cfg["fwd"], "gluon": gluon}
    _check_parity((2, 1000, 1024, 6, 3, 128), torch.bfloat16, True, cfg)
    assert calls == [1] * gluon


@pytest.mark.gpu
def test_gpu_gluon_forward_leaves_what_it_cannot_read_to_triton(monkeypatch):
    """q in [B, H, N, D] memory has no 2D TMA view: the Triton forward serves it, correctly."""
    if gluon_paths.module("forward") is None or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward is built for sm90")
    calls = _gluon_calls(monkeypatch)
    q, k, v = _inputs((1, 300, 300, 4, 2, 128), torch.bfloat16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    got, dout = _run(q, k, v, True, _gpu_config(torch.bfloat16, 128))
    _compare(got, _reference(q, k, v, True, dout), torch.bfloat16)
    # B > 1 with M not a multiple of BLOCK_N: K/V tiles would cross into the next batch.
    q, k, v = _inputs((2, 300, 300, 4, 2, 128), torch.bfloat16)
    v[1, :20] = float("inf")  # would turn batch 0 into NaN through 0 * inf
    out = tf.flash_attention(q, k, v, config=_gpu_config(torch.bfloat16, 128))
    assert torch.isfinite(out[0]).all()
    assert calls == []


SM90 = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)


class _CountingCache(dict):
    """fast_launch's cache, counting the calls that went straight to a compiled kernel."""

    hits = 0

    def get(self, key, default=None):
        found = super().get(key, default)
        self.hits += found is not None
        return found


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"h{d}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_repeat_calls_launch_directly_and_stay_right(d, causal, monkeypatch):
    """The second call of a shape skips Triton's binder (every launch of forward and backward
    hits fast_launch's cache) and is as right as the first, on fresh inputs into NaN-poisoned
    outputs; a misaligned q of the same shape is another key, and right too."""
    cache = _CountingCache()
    monkeypatch.setattr(fast_launch, "_COMPILED", cache)
    shape, cfg = (1, 1000, 1024, 8, 2, d), _gpu_config(torch.bfloat16, d)
    _check_parity(shape, torch.bfloat16, causal, cfg)
    entries, first_hits = len(cache), cache.hits
    _check_parity(shape, torch.bfloat16, causal, cfg)
    assert entries >= 2  # the forward's kernel and the backward's
    assert len(cache) == entries  # no new key
    assert cache.hits - first_hits == entries
    q, k, v = _inputs(shape, torch.bfloat16)
    flat = torch.empty(q.numel() + 1, dtype=q.dtype, device=q.device)
    q = flat[1:].view(q.shape).copy_(q)  # 2 bytes past a 16-byte boundary
    got, dout = _run(q, k, v, causal, cfg)
    _compare(got, _reference(q, k, v, causal, dout), torch.bfloat16)
    assert len(cache) > entries


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="the Gluon backward is built for sm90")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [
    (2, 1024, 1024, 6, 3),  # B > 1 (N % 64 == 0 and M % 128 == 0), GQA
    (1, 700, 900, 4, 1),  # N != M, neither a multiple of a block, MQA
    (1, 1000, 700, 4, 2),  # N > M: causal rows that see no key
    (1, 1, 300, 2, 2)], ids=["b2_gqa", "n_lt_m", "n_gt_m", "n1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [128, 64], ids=lambda d: f"h{d}")
def test_gpu_gluon_backward(d, shape, dtype, causal, monkeypatch):
    """The Gluon backward (dq, dk, dv; NaN-poisoned) against float64, and that it really ran,
    with the forward from the Triton kernel or the Gluon one, as the config says. D=128 splits
    dQ's columns between the warpgroups, D=64 does not (its own code path)."""
    calls = _gluon_calls(monkeypatch, "backward")
    cfg = {name: dict(entry) for name, entry in _gpu_config(dtype, d).items()}
    cfg.pop("bwd_dkdv_causal", None)
    cfg["bwd_dkdv"]["gluon"] = 1
    _check_parity((*shape, d), dtype, causal, cfg)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="the Gluon backward is built for sm90")
@pytest.mark.parametrize("peeled", [(), (64, 128)], ids=["one_loop", "peeled"])
@pytest.mark.parametrize("d", [128, 64], ids=lambda d: f"h{d}")
def test_gpu_gluon_backward_causal_loops(d, peeled, monkeypatch):
    # Both ways of walking the causal steps at both head sizes, whichever ships for each.
    calls = _gluon_calls(monkeypatch, "backward")
    monkeypatch.setattr(gluon_paths.module("backward"), "PEELED_HEAD_SIZES", peeled)
    cfg = {name: dict(entry) for name, entry in _gpu_config(torch.bfloat16, d).items()}
    cfg.pop("bwd_dkdv_causal", None)
    cfg["bwd_dkdv"]["gluon"] = 1
    _check_parity((1, 700, 900, 4, 1, d), torch.bfloat16, True, cfg)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="the Gluon backward is built for sm90")
@pytest.mark.parametrize("group", [1, 5], ids=lambda g: f"group{g}")
def test_gpu_gluon_backward_head_groups(group, monkeypatch):
    # 3 kv heads of 2 batches in groups of 1 and of 5 (a short last group): every key once.
    calls = _gluon_calls(monkeypatch, "backward")
    monkeypatch.setattr(tf, "bwd_head_group", lambda q, k, causal: group)
    cfg = {name: dict(entry) for name, entry in _gpu_config(torch.bfloat16, 128).items()}
    cfg.pop("bwd_dkdv_causal", None)
    cfg["bwd_dkdv"]["gluon"] = 1
    _check_parity((2, 512, 1024, 6, 3, 128), torch.bfloat16, True, cfg)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="the Gluon backward is built for sm90")
def test_gpu_gluon_backward_leaves_what_it_cannot_read_to_triton(monkeypatch):
    """B > 1 with N not a multiple of 64: a Q tile would cross into the next batch, whose inf
    would reach this batch's dK/dV. The Triton kernels serve it, correctly; so D != 128."""
    calls = _gluon_calls(monkeypatch, "backward")
    cfg = {name: dict(entry) for name, entry in _gpu_config(torch.bfloat16, 128).items()}
    cfg["bwd_dkdv"]["gluon"] = 1
    _check_parity((2, 1000, 1024, 4, 2, 128), torch.bfloat16, False, cfg)
    _check_parity((1, 300, 300, 4, 2, 96), torch.bfloat16, False, cfg)
    q, k, v = (t.requires_grad_() for t in _inputs((2, 300, 256, 2, 2, 128), torch.bfloat16))
    out = tf.flash_attention(q, k, v, config=cfg)
    dout = torch.randn_like(out)
    dout[1, :20] = float("inf")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert all(torch.isfinite(g[0]).all() for g in (dq, dk, dv))
    assert calls == []


@pytest.mark.gpu
def test_gpu_float32():
    _check_parity((1, 129, 77, 4, 2, 96), torch.float32, True, _gpu_config(torch.float32, 96))


@pytest.mark.gpu
def test_gpu_deterministic():
    q, k, v = _inputs((1, 2048, 2048, 8, 2, 128), torch.bfloat16)
    dout = torch.randn_like(q)
    cfg = _gpu_config(torch.bfloat16, 128)
    runs = []
    for _ in range(2):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out, lse = tf.flash_attention(qq, kk, vv, causal=True, return_lse=True, config=cfg)
        runs.append((out, lse, *torch.autograd.grad(out, (qq, kk, vv), dout)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
