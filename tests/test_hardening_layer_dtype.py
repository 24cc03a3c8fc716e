"""Hardening (issue 18): a freshly built layer's decision is the one its first forward uses
where the dtype is known (`LocalAttention(..., dtype=...)`, as FastVideo's layers know their
compute dtype). Without it the layer reported the default dtype's (fp32) decision and then
switched backends at its first bf16 forward.
"""

from __future__ import annotations

import pytest
import torch

import attnrt
from attnrt.errors import AttnrtError
from tests.helpers import make_backend

ALLOWED = ["BF16_ONLY", "REFERENCE"]


@pytest.fixture
def bf16_only(register):
    register("BF16_ONLY", make_backend("BF16_ONLY", PLATFORMS=frozenset({"cpu"}),
                                       DTYPES=frozenset({"bf16"})))


def _forward_backend(layer: attnrt.LocalAttention) -> str | None:
    q, k, v = (torch.randn(1, 8, 2, 16, dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        layer(q, k, v)
    return layer.backend_name


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bf16"])
def test_a_layer_built_with_its_dtype_reports_what_its_first_forward_uses(bf16_only, dtype):
    with torch.no_grad():
        layer = attnrt.LocalAttention(2, 16, supported_attention_backends=ALLOWED, dtype=dtype)
    built = layer.backend_name
    assert built == "BF16_ONLY"
    assert layer.compute_dtype is torch.bfloat16
    assert _forward_backend(layer) == built


def test_without_dtype_the_default_dtype_decides_until_the_first_forward(bf16_only):
    with torch.no_grad():
        layer = attnrt.LocalAttention(2, 16, supported_attention_backends=ALLOWED)
    assert layer.compute_dtype is None
    assert layer.backend_name == "REFERENCE"  # fp32, the default dtype
    assert _forward_backend(layer) == "BF16_ONLY"


@pytest.mark.parametrize("bad", [torch.int8, torch.float8_e4m3fn, "fp8", 16])
def test_a_dtype_attnrt_cannot_run_is_named(bad):
    with pytest.raises(AttnrtError, match=r"dtype=.* is not allowed; allowed: None"):
        attnrt.LocalAttention(2, 16, dtype=bad)


def test_distributed_attention_takes_the_dtype_its_local_attention_selects_for(bf16_only):
    """DistributedAttention(dtype=...) hands the dtype to the LocalAttention it builds per SP
    size, and its FastVideo attribute attn_impl is the impl for that dtype."""
    with torch.no_grad():
        layer = attnrt.DistributedAttention(2, 16, supported_attention_backends=ALLOWED,
                                            dtype="bf16")
        assert layer.compute_dtype is torch.bfloat16
        local = layer.local_for(1)
        assert local.compute_dtype is torch.bfloat16
        assert local.backend_name == "BF16_ONLY"
        assert type(layer.attn_impl).__name__ != "ReferenceImpl"
        assert layer.attn_impl is local.impl_for(torch.bfloat16)
        assert _forward_backend(local) == "BF16_ONLY"


@pytest.mark.parametrize("bad", [torch.int8, "fp8"])
def test_distributed_attention_names_a_bad_dtype_without_an_sp_group(bad):
    with pytest.raises(AttnrtError, match=r"dtype=.* is not allowed; allowed: None"):
        attnrt.DistributedAttention(2, 16, dtype=bad)
