"""The shipped capability.yaml on every simulated platform, against hand-written expectations
(tests/fixtures/shipped_expect.yaml): a re-ranking that changes a choice must change the fixture."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

import attnrt
from attnrt.selection.request import AttentionRequest

# Package checks as on a machine with torch alone (simulated devices assume them otherwise).
pytestmark = pytest.mark.usefixtures("local_packages")

CASES = yaml.safe_load((Path(__file__).parent / "fixtures" / "shipped_expect.yaml").read_text())


def _case_id(case: dict) -> str:
    kv = f"-kv{case['kv_heads']}" if "kv_heads" in case else ""
    return f"{case['device']}-{case['dtype']}-h{case['head_size']}{kv}" \
           f"{'-causal' if case.get('causal') else ''}{'-grad' if case.get('grad') else ''}" \
           f"{'-n' + str(case['seq_len']) if 'seq_len' in case else ''}"


@pytest.mark.parametrize("case", CASES["cases"], ids=_case_id)
def test_shipped_choice(case, monkeypatch):
    for module in CASES["absent"]:
        monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    heads = case.get("heads", 8)
    request = AttentionRequest(case["head_size"], case["dtype"], heads, case.get("kv_heads"),
                               case.get("causal", False), grad=case.get("grad", False),
                               seq_len=case.get("seq_len"))
    decision = attnrt.explain(request, device=case["device"])
    assert decision.backend == case["expect"], decision.explain()
    assert decision.device.simulated
    if decision.rule is not None:
        assert decision.rule.file.endswith("capability.yaml")
