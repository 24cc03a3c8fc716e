"""SLA_ATTN, SAGE_SLA_ATTN, VMOBA_ATTN: the backend contract, declared capabilities read by the
generic check, and each declared limit refused with a reason naming it."""

from __future__ import annotations

import pytest

from attnrt.selection.capability import check
from attnrt.selection.device import parse_device_spec
from attnrt.selection.registry import validate_backend_class
from attnrt.selection.request import AttentionRequest
from attnrt.sparse.sla_backend import (
    GRAD,
    SageSLAAttentionBackend,
    SLAAttentionBackend,
    VMOBAAttentionBackend,
)

BACKENDS = [(SLAAttentionBackend, "SLA_ATTN", "sla"),
            (SageSLAAttentionBackend, "SAGE_SLA_ATTN", "sage_sla"),
            (VMOBAAttentionBackend, "VMOBA_ATTN", "vmoba")]


def request(head_size: int = 128, dtype: str = "bf16", heads: int = 8, kv_heads: int = 8,
            causal: bool = False, grad: bool = False, method: str = "sla") -> AttentionRequest:
    return AttentionRequest(head_size, dtype, heads, kv_heads, causal, None, grad, None, method)


@pytest.mark.parametrize(("cls", "name", "method"), BACKENDS)
def test_contract_and_method(cls: type, name: str, method: str) -> None:
    validate_backend_class(name, cls)
    assert cls.get_name() == name
    assert frozenset({method}) == cls.METHODS


@pytest.mark.parametrize(("cls", "name", "method"), BACKENDS)
def test_declared_limits_refused(cls: type, name: str, method: str) -> None:
    hopper = parse_device_spec("cuda:sm90")
    reasons = [str(r) for r in check(cls, request(causal=True, head_size=12, method=method),
                                     hopper)]
    assert any("causal=True is not supported by " + name in r for r in reasons)
    assert any("head_size=12 is not supported by " + name in r for r in reasons)
    cpu = parse_device_spec("cpu")
    assert any("platform=cpu is not supported" in str(r)
               for r in check(cls, request(method=method), cpu))
    assert [r.code for r in check(cls, request(method="dense"), hopper)] == ["METHOD"]


def test_sage_sla_refuses_grad_gqa_and_ampere() -> None:
    hopper = parse_device_spec("cuda:sm90")
    reasons = SageSLAAttentionBackend.extra_reasons(request(grad=True, method="sage_sla"), hopper)
    assert [r.code for r in reasons] == [GRAD]
    assert "inference only" in reasons[0].message
    assert SageSLAAttentionBackend.extra_reasons(request(method="sage_sla"), hopper) == []
    gqa = check(SageSLAAttentionBackend, request(kv_heads=2, method="sage_sla"), hopper)
    assert any("GQA" in str(r) for r in gqa)
    ampere = check(SageSLAAttentionBackend, request(method="sage_sla"),
                   parse_device_spec("cuda:sm80"))
    assert any("arch=sm80 is not supported by SAGE_SLA_ATTN" in str(r) for r in ampere)


def test_sla_and_vmoba_serve_gqa_on_ampere() -> None:
    ampere = parse_device_spec("cuda:sm80")
    for cls, method in ((SLAAttentionBackend, "sla"), (VMOBAAttentionBackend, "vmoba")):
        reasons = check(cls, request(kv_heads=2, method=method), ampere)
        assert not [r for r in reasons if r.code != "PACKAGE_MISSING"]
    assert VMOBAAttentionBackend.SUPPORTS_REPLICATED_TOKENS is False
