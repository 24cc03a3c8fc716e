"""The emitter's one algebraic rewrite (engine/emit.py `distributed`): c * (a - b) as c*a - c*b
when c is per program and a, b each vary along one tile axis, as in ALiBi's
slope * (kv_idx - q_idx). Numerics are the variants' own tests (test_examples, alibi); here:
where it applies and what the kernel text computes per score."""

from __future__ import annotations

from attnrt.engine.codegen import KernelFlags, source
from attnrt.engine.emit import distributed
from attnrt.engine.library import AttentionLibrary
from attnrt.engine.spec import index_leaves
from attnrt.engine.trace import FLOAT, INT, Expr, leaf, make


def test_it_splits_a_per_program_factor_over_a_row_and_a_column_term():
    b, h, q_idx, kv_idx = index_leaves()
    slope = Expr("input", (h,), attr="slopes", kind=FLOAT)  # slopes[h]: per program
    e = make("mul", slope, make("sub", kv_idx, q_idx))
    split = distributed(e)
    assert split is not None
    assert split.op == "sub"
    assert [a.op for a in split.args] == ["mul", "mul"]
    assert {a.args[1].attr for a in split.args} == {"kv_idx", "q_idx"}
    assert distributed(make("mul", 0.5, make("add", q_idx, 3))) is not None  # row + scalar


def test_it_leaves_everything_else_alone():
    b, h, q_idx, kv_idx = index_leaves()
    score = leaf("score")
    assert distributed(make("mul", score, make("sub", kv_idx, q_idx))) is None  # c varies
    assert distributed(make("mul", 0.5, make("sub", score, q_idx))) is None  # a is a tile
    assert distributed(make("mul", 0.5, make("sub", q_idx, q_idx * 2))) is None  # one axis
    ints = make("mul", 3, make("sub", kv_idx, q_idx))
    assert ints.kind == INT
    assert distributed(ints) is None  # integers: left as written
    assert distributed(make("add", 0.5, make("sub", kv_idx, q_idx))) is None  # not a product


def test_alibi_s_kernel_subtracts_a_row_and_a_column_of_products():
    variant = AttentionLibrary("AlibiAttention", "None", head_size=128,
                               backend="triton").variant
    text = source(variant, KernelFlags(False, False, ()))
    assert "(kv_idx - q_idx)" not in text  # no integer tile of differences
    assert "* kv_idx.to(tl.float32))" in text
    assert "* q_idx.to(tl.float32))" in text
