"""AttentionEngine's own API, written as its getting-started example writes it: an OnlineFunc
subclass with SymbolScalar/Var row scales, qkv_meta from meta_tensor, CustomIO inputs read
through input_tensors, mod(q, k, v) and out.backward(do)."""

from __future__ import annotations

import pytest
import torch

from attnrt.engine.api import AttentionEngine, CustomIO, OnlineFunc, SymbolScalar, Var, meta_tensor
from attnrt.engine.errors import EngineInputError
from attnrt.engine.spec import trace_variant
from tests.conftest import TOLERANCE, rel_l2
from tests.engine.cases import attend, grid, scores

HAS_CUDA = torch.cuda.is_available()
D = 16
softmax_scale = 1 / D ** 0.5


class UserOnlineSoftmax(OnlineFunc):
    def __init__(self):
        online_rowscales = {"m": SymbolScalar("m", Var("-inf")), "r": SymbolScalar("r", Var("0.0"))}
        final_rowscales = {"lse": SymbolScalar("lse", Var("0.0"))}
        super().__init__(online_rowscales, final_rowscales, CustomIO({}))

    @staticmethod
    def online_fwd(scores, online_rowscales, b, h, q_idx):
        m, r = online_rowscales["m"], online_rowscales["r"]
        m_new = m.max(scores.get_reduce("max"))
        scale_tmp = (m - m_new).exp()
        r = r * scale_tmp
        scores = (scores - m_new).exp()
        r = r + scores.get_reduce("sum")
        return scores, {"m": m_new, "r": r}, scale_tmp

    @staticmethod
    def online_fwd_epilogue(o, online_rowscales, b, h, q_idx):
        o_new = o / online_rowscales["r"]
        lse = (online_rowscales["r"]).log() + online_rowscales["m"]
        return o_new, {"lse": lse}

    @staticmethod
    def forward(scores, final_rowscales, b, h, q_idx, kv_idx):
        return (scores - final_rowscales["lse"]).exp()

    @staticmethod
    def backward(dp, scores, final_rowscales, doosum, b, h, q_idx, kv_idx):
        return (dp - doosum) * scores


def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
    return score * softmax_scale + custom_fwd_inputs.input_tensors["softmax_bias"]


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _engine(backend, dtype):
    meta = (meta_tensor(1, 2, 40, D, dtype=dtype),) * 3
    return AttentionEngine(meta, score_mod, CustomIO({"softmax_bias": (1,)}),
                           UserOnlineSoftmax(), causal_mask, backend=backend)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[
    pytest.mark.interpret, pytest.mark.skipif(HAS_CUDA, reason="interpreter case")])])
def test_getting_started_example_forward_backward_and_lse(backend):
    dtype = torch.float32
    mod = _engine(backend, dtype)
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, 40, 2, D, generator=gen).requires_grad_() for _ in range(3))
    bias = torch.tensor([0.25])  # exact in float32
    out = mod(q, k, v, [bias])
    do = torch.randn_like(out)
    out.backward(do)
    i, j = grid(40, 40)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    dense = attend(scores(q64, k64) * softmax_scale + 0.25, j <= i, v64)
    dense.backward(do.double())
    assert rel_l2(out, dense) < TOLERANCE[dtype]
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_l2(got, want) < 2e-5
    _, finals = mod.reference(q.double(), k.double(), v.double(), [bias.double()])
    lse = torch.logsumexp((scores(q64, k64) * softmax_scale + 0.25).masked_fill(~(j <= i),
                                                                             -torch.inf), -1)
    assert rel_l2(finals["lse"], lse) < 1e-12


def test_qkv_meta_fixes_head_sizes_and_dtype():
    mod = _engine("reference", torch.float16)
    q, k, v = (torch.randn(1, 8, 2, D) for _ in range(3))
    with pytest.raises(EngineInputError, match="do not match qkv_meta"):
        mod(q, k, v, [torch.zeros(1)])


def test_equal_variants_share_one_cache_key_and_different_ones_do_not():
    a = trace_variant(score_mod, causal_mask, UserOnlineSoftmax(), CustomIO({"softmax_bias": (1,)}))
    b = trace_variant(lambda s, c, b, h, q, kv: s * softmax_scale + c["softmax_bias"],
                      lambda b, h, q, kv: kv <= q, None, CustomIO({"softmax_bias": (1,)}))
    c = trace_variant(score_mod, None, None, CustomIO({"softmax_bias": (1,)}))
    assert a.key == b.key  # q >= kv and kv <= q trace to one canonical text
    assert a.key != c.key


def test_describe_shows_the_traced_expressions_or_why_untraced():
    text = _engine("reference", torch.float32).describe()
    assert "score=add(mul(score, 0.25), softmax_bias[0])" in text
    assert "mask=le(kv_idx, q_idx)" in text
    untraced = AttentionEngine(None, lambda s, c, b, h, q, kv: torch.special.erf(s),
                               backend="reference")
    assert untraced.describe().startswith("untraced")
