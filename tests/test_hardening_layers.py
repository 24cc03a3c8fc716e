"""Hardening (issue 18): layer arguments and inputs that used to run silently wrong or fail untyped.

Each test failed before its fix: a typo in an extra argument ran non-causal, a NaN softmax_scale
ran, LocalAttention(2, 0) divided by zero, a bare tensor as freqs_cis failed to unpack.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnrt
from attnrt.errors import AttnrtError
from attnrt.interfaces import AttentionBackend, ScaledImpl
from tests.helpers import randn_qkv

LAYERS = [attnrt.LocalAttention, attnrt.DistributedAttention]


@pytest.mark.parametrize("layer_cls", LAYERS)
def test_a_misspelt_extra_argument_is_refused_naming_it_and_the_closest_name(layer_cls) -> None:
    with pytest.raises(AttnrtError, match=r"casual=True .*did you mean 'causal'") as info:
        layer_cls(2, 64, casual=True)
    assert isinstance(info.value, TypeError)


class WindowImpl(ScaledImpl):
    """Reads one extra argument, `window`, and keeps it where a test can see it."""

    EXTRA_IMPL_ARGS = frozenset({"window"})

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        from attnrt.backends.reference import chunked_attention

        out = chunked_attention(query, key, value, self.causal, self.softmax_scale)
        return out  # type: ignore[return-value]


class WindowBackend(AttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "WINDOW_TEST"

    @staticmethod
    def get_impl_cls() -> type[WindowImpl]:
        return WindowImpl


def test_an_extra_argument_reaches_the_impl_that_declares_it(register) -> None:
    register("WINDOW_TEST", WindowBackend)
    layer = attnrt.LocalAttention(2, 16, supported_attention_backends=("WINDOW_TEST",), window=8)
    impl = layer.impl_for(torch.float32)
    assert isinstance(impl, WindowImpl)
    assert impl.extra_impl_args == {"window": 8}


def test_an_extra_argument_the_selected_impl_does_not_read_is_refused_at_forward(register) -> None:
    register("WINDOW_TEST", WindowBackend)
    layer = attnrt.LocalAttention(2, 16, supported_attention_backends=("REFERENCE",), window=8)
    with pytest.raises(AttnrtError, match="window=8 is not read by backend REFERENCE"):
        layer(*randn_qkv(1, 4, 2, 16, seed=0))


@pytest.mark.parametrize("layer_cls", LAYERS)
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), 0.0, -0.5, True,
                                   "0.1"])
def test_a_softmax_scale_that_cannot_be_right_is_refused_at_construction(layer_cls,
                                                                         scale) -> None:
    with pytest.raises(AttnrtError, match=r"softmax_scale=.* is not allowed") as info:
        layer_cls(2, 16, softmax_scale=scale)
    assert isinstance(info.value, ValueError)


def test_a_valid_softmax_scale_is_kept_as_a_float() -> None:
    layer = attnrt.LocalAttention(2, 16, softmax_scale=1)
    assert layer.softmax_scale == 1.0
    assert isinstance(layer.softmax_scale, float)


@pytest.mark.parametrize("layer_cls", LAYERS)
@pytest.mark.parametrize(("args", "kwargs", "named"), [
    ((2, 0), {}, "head_size=0"),
    ((0, 16), {}, "num_heads=0"),
    ((2.0, 16), {}, "num_heads=2.0"),
    ((4, 16), {"num_kv_heads": 3}, "num_kv_heads=3"),
    ((4, 16), {"num_kv_heads": 0}, "num_kv_heads=0"),
    ((4, 16), {"causal": "yes"}, "causal='yes'"),
])
def test_bad_sizes_are_typed_errors_naming_the_argument(layer_cls, args, kwargs, named) -> None:
    with pytest.raises(AttnrtError, match=named) as info:
        layer_cls(*args, **kwargs)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("freqs", ["tensor", "triple", "strings"])
def test_freqs_cis_that_is_not_a_pair_of_tensors_is_a_typed_error(freqs: str) -> None:
    layer = attnrt.LocalAttention(2, 16)
    q, k, v = randn_qkv(1, 4, 2, 16, seed=0)
    cos = torch.ones(4, 8)
    given = {"tensor": cos, "triple": (cos, cos, cos), "strings": ("a", "b")}[freqs]
    with pytest.raises(AttnrtError, match="freqs_cis is a"):
        layer(q, k, v, freqs_cis=given)


def test_a_float8_query_is_a_typed_error_naming_the_allowed_dtypes() -> None:
    layer = attnrt.LocalAttention(2, 16)
    q, k, v = (t.to(torch.float8_e4m3fn) for t in randn_qkv(1, 4, 2, 16, seed=0))
    with pytest.raises(AttnrtError, match=r"q.dtype=torch.float8_e4m3fn is not a "
                       "floating dtype attnrt runs; allowed: float16"):
        layer(q, k, v)


def test_bad_input_errors_are_typed_and_keep_their_builtin_class() -> None:
    layer = attnrt.LocalAttention(2, 16)
    q, k, v = randn_qkv(1, 4, 2, 16, seed=0)
    with pytest.raises(AttnrtError, match="3 heads") as info:
        layer(q, k[:, :, :1].expand(1, 4, 3, 16), v)
    assert isinstance(info.value, ValueError)
    with pytest.raises(AttnrtError, match="dtypes must match") as info:
        layer(q, k.double(), v)
    assert isinstance(info.value, TypeError)


def test_fastvideo_dropout_rate_zero_is_taken_and_any_other_value_refused() -> None:
    from attnrt.layer_args import LayerArgumentError

    layer = attnrt.LocalAttention(2, 64, dropout_rate=0)  # FastVideo's cross-attention passes it
    assert "dropout_rate" not in layer.extra_impl_args
    with pytest.raises(LayerArgumentError, match=r"dropout_rate=0.1 is not allowed; allowed: 0"):
        attnrt.LocalAttention(2, 64, dropout_rate=0.1)
