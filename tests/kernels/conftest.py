"""Every kernel test starts without remembered forward plans or compiled-kernel handles, so a
test that replaces a helper (head_group, _launch_args, ...) sees its replacement used."""

from __future__ import annotations

import pytest

from attnrt.kernels import fast_launch
from attnrt.kernels.flash import launch as tf


@pytest.fixture(autouse=True)
def fresh_launch_caches():
    tf.clear_plans()
    fast_launch.clear()
    yield
    tf.clear_plans()
    fast_launch.clear()
