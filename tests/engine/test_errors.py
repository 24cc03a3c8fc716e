"""Bad input: typed errors naming the function (or argument) and the problem, raised at
construction or, for shape-dependent problems, at the first call, before any kernel runs."""

from __future__ import annotations

import math

import pytest
import torch

from attnrt.engine.errors import EngineInputError, TraceError
from attnrt.engine.library import AttentionLibrary
from attnrt.engine.online import OnlineSoftmax
from attnrt.engine.softmax import AttentionEngine
from attnrt.engine.spec import CustomIO
from attnrt.errors import AttnrtError
from tests.helpers import randn_qkv


def _engine(score_mod=None, mask_mod=None, custom=None, online=None):
    return AttentionEngine(None, score_mod, custom, online, mask_mod, backend="reference")


def test_data_dependent_control_flow_is_refused_naming_the_users_line():
    def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        if score > 0:  # the line the error must point at
            return score
        return -score

    with pytest.raises(TraceError) as info:
        AttentionEngine(None, score_mod)
    assert "score_mod cannot be traced" in str(info.value)
    assert "test_errors.py" in str(info.value)
    assert "if score > 0:" in str(info.value)
    assert isinstance(info.value, AttnrtError)


def test_math_functions_on_traced_values_are_refused():
    with pytest.raises(TraceError, match=r"float\(\) of a traced value"):
        AttentionEngine(None, lambda s, c, b, h, q, kv: math.exp(s))


@pytest.mark.parametrize(("fn", "problem"), [
    (lambda s, c: s, "must take 6"),
    (lambda s, c, b, h, q, kv: (s, s), "returned tuple"),
    (lambda s, c, b, h, q, kv: s > 0, "returned a boolean"),
    (lambda s, c, b, h, q, kv: torch.zeros(3), "returned Tensor"),
    (lambda s, c, b, h, q, kv: s + torch.zeros(3), "declare them in custom_fwd_inputs"),
])
def test_score_mod_of_wrong_arity_or_return_type(fn, problem):
    with pytest.raises(TraceError, match="score_mod") as info:
        AttentionEngine(None, fn)
    assert problem in str(info.value)


@pytest.mark.parametrize(("fn", "problem"), [
    (lambda b, h, q: q > 0, "must take 4 or 5"),
    (lambda b, h, q, kv: q - kv, "must return a boolean"),
    (lambda b, h, q, kv: "yes", "returned str"),
])
def test_mask_mod_of_wrong_arity_or_return_type(fn, problem):
    with pytest.raises(TraceError, match="mask_mod") as info:
        AttentionEngine(None, None, mask_mod=fn)
    assert problem in str(info.value)


def test_online_func_missing_a_method_is_refused_naming_it():
    class NoBackward(OnlineSoftmax):
        backward = None

    with pytest.raises(TraceError, match="NoBackward does not define backward"):
        AttentionEngine(None, None, online_func=NoBackward())


def test_reading_an_undeclared_custom_input():
    with pytest.raises(TraceError, match="'bias' is read but not declared"):
        AttentionEngine(None, lambda s, c, b, h, q, kv: s + c["bias"][h], CustomIO({}))


def test_index_out_of_range_is_refused_at_the_first_call():
    mod = _engine(lambda s, c, b, h, q, kv: s + c["bias"][h, q - kv + 10],
                  custom=CustomIO({"bias": ("heads", 21)}))
    q, k, v = randn_qkv(1, 16, 2, 8)
    with pytest.raises(EngineInputError, match=r"'bias' at dim 1 .* \[-5, 25\]"):
        mod(q, k, v, [torch.zeros(2, 21)])
    out = mod(q[:, :11], k[:, :11], v[:, :11], [torch.zeros(2, 21)])  # in range: runs
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("tensor", "problem"), [
    (torch.zeros(2, device="meta"), "is on meta"),
    (torch.zeros(2, dtype=torch.float64), "dtype torch.float64"),
    (torch.zeros(3), r"shape \(3,\)"),
    ([1.0, 2.0], "not a tensor"),
])
def test_custom_inputs_on_another_device_dtype_or_shape(tensor, problem):
    mod = _engine(lambda s, c, b, h, q, kv: s * c["w"][h], custom=CustomIO({"w": ("heads",)}))
    q, k, v = randn_qkv(1, 8, 2, 8)
    with pytest.raises(EngineInputError, match=problem):
        mod(q, k, v, [tensor])


def test_wrong_number_of_custom_inputs():
    mod = _engine(lambda s, c, b, h, q, kv: s * c["w"][h], custom=CustomIO({"w": ("heads",)}))
    q, k, v = randn_qkv(1, 8, 2, 8)
    with pytest.raises(EngineInputError, match="declares 1: w"):
        mod(q, k, v)


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"cu_len_q": torch.tensor([0, 3, 8])}, "together"),
    ({"cu_len_q": torch.tensor([0, 3, 9]), "cu_len_kv": torch.tensor([0, 3, 8])},
     "rise from 0 to 8"),
    ({"block_sparse_mask": torch.ones(1, 2, 2, 2, dtype=torch.bool)}, "must be bool"),
    ({"block_sparse_indices": torch.zeros(1, 2, 1, 1, dtype=torch.int32),
      "block_num": torch.ones(1, 2, 1, dtype=torch.int32)}, "outside"),
])
def test_bad_layouts(kwargs, problem):
    mod = _engine()
    q, k, v = randn_qkv(1, 8, 2, 8)
    if "block_sparse_indices" in kwargs:
        kwargs["block_sparse_indices"] += 5
    with pytest.raises(EngineInputError, match=problem):
        mod(q, k, v, **kwargs)


def test_library_names_are_checked():
    with pytest.raises(EngineInputError, match="attn_type='Linear'; allowed: SoftmaxAttention"):
        AttentionLibrary("Linear")
    with pytest.raises(EngineInputError, match="window=None"):
        AttentionLibrary("SoftmaxAttention", "SlidingWindow")


def test_online_fwd_returning_undeclared_or_per_key_row_scales_is_refused():
    class WrongKeys(OnlineSoftmax):
        @staticmethod
        def online_fwd(scores, online_rowscales, b, h, q_idx):
            p, rows, scale = OnlineSoftmax.online_fwd(scores, online_rowscales, b, h, q_idx)
            return p, {"m": rows["m"]}, scale

    class PerKey(OnlineSoftmax):
        @staticmethod
        def online_fwd(scores, online_rowscales, b, h, q_idx):
            p, rows, scale = OnlineSoftmax.online_fwd(scores, online_rowscales, b, h, q_idx)
            return p, {"m": rows["m"], "r": scores}, scale

    with pytest.raises(TraceError, match=r"WrongKeys.online_fwd returned row scales \['m'\]"):
        AttentionEngine(None, None, online_func=WrongKeys())
    with pytest.raises(TraceError, match="row scale 'r' = score varies along the keys"):
        AttentionEngine(None, None, online_func=PerKey())
