"""Every kernel test starts without remembered forward plans or compiled-kernel handles, so a
test that replaces a helper (head_group, _launch_args, ...) sees its replacement used."""

from __future__ import annotations

import pytest

from attnrt.kernels import fast_launch
from attnrt.kernels.flash import launch as tf
from tests.triton_support import installed_triton, interpreter_skip_reason, interpreting


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Interpret-marked tests skip, saying why, under a Triton whose interpreter is too old."""
    reason = interpreter_skip_reason(installed_triton(), interpreting())
    if reason is None:
        return
    for item in items:
        if "interpret" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def fresh_launch_caches():
    tf.clear_plans()
    fast_launch.clear()
    yield
    tf.clear_plans()
    fast_launch.clear()
