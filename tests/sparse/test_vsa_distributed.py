"""Real VSA through DistributedAttention_VSA on 2 and 4 gloo ranks (checks in
tests/sparse/vsa_dist_checks.py, run by the harness of tests/dist_worker.py)."""

from __future__ import annotations

import pytest

from tests.dist_worker import run_world
from tests.sparse.vsa_dist_checks import VSA_CHECKS


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_vsa_on_gloo_ranks_equals_single_process_vsa(world: int) -> None:
    results = run_world(world, VSA_CHECKS, timeout=240.0)
    failures = [f"--- {name} on rank {rank}:\n{verdict}"
                for name, by_rank in results.items() for rank, verdict in by_rank.items()
                if verdict != "ok"]
    assert not failures, "\n".join(failures)
