"""attnrt.kernels.fast_launch on CPU, with a stand-in for a Triton kernel: which calls go through
Triton's binder and which straight to the compiled kernel, and with what arguments. The real
kernels are checked against float64 through it on the GPU (tests/kernels/test_triton_flash.py)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from attnrt.kernels import fast_launch


def _kernel_fn(X, n, scale, strides, BLOCK, UNIT=1):  # the parameters the stand-in declares
    pass


class FakeCompiled:
    """What Triton's launch returns on a GPU: compiled[grid](*every argument in order)."""

    packed_metadata = object()

    def __init__(self) -> None:
        self.direct: list[tuple[tuple[int, ...], tuple[Any, ...]]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        assert len(grid) == 3, "Triton's compiled kernel reads grid[0], grid[1], grid[2]"
        return lambda *args: self.direct.append((grid, args))


class FakeKernel:
    """A @triton.jit function: kernel[grid](*args, **kwargs) binds, then launches."""

    signature = inspect.signature(_kernel_fn)
    arg_names = list(signature.parameters)

    def __init__(self, returns: Any = "compiled") -> None:
        self.compiled = FakeCompiled() if returns == "compiled" else returns
        self.bound: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            self.bound.append((args, kwargs))
            return self.compiled
        return run


@pytest.fixture(autouse=True)
def empty_cache():
    fast_launch.clear()
    yield
    fast_launch.clear()


def test_a_repeat_key_goes_straight_to_the_compiled_kernel():
    kernel = FakeKernel()
    x = torch.zeros(64)
    for n, scale in ((32, 0.5), (48, 0.25)):  # 32 and 48: both divisible by 16, both i32
        got = fast_launch.launch(kernel, (4,), (x, n, scale, (64, 1)),
                                 {"BLOCK": 16, "num_warps": 4})
        assert got is kernel.compiled
    assert len(kernel.bound) == 1
    # Every parameter in order: the call's own values, BLOCK from kwargs, UNIT's default;
    # num_warps is a launch option, compiled into the kernel.
    assert kernel.compiled.direct == [((4, 1, 1), (x, 48, 0.25, (64, 1), 16, 1))]


@pytest.mark.parametrize("change", ["int_divisibility", "int_one", "tuple_entry", "misaligned",
                                    "dtype", "constexpr", "option", "grid"])
def test_what_triton_specializes_on_goes_through_triton_again(change):
    kernel = FakeKernel()
    x = torch.zeros(64, dtype=torch.float16)
    base = ((x, 32, 0.5, (64, 1)), {"BLOCK": 16, "num_warps": 4}, (4,))
    args, kwargs, grid = base
    if change == "int_divisibility":
        args = (x, 33, 0.5, (64, 1))
    elif change == "int_one":
        args = (x, 1, 0.5, (64, 1))
    elif change == "tuple_entry":
        args = (x, 32, 0.5, (64, 2))
    elif change == "misaligned":
        args = (x[1:], 32, 0.5, (64, 1))  # 2 bytes past a 16-byte boundary
    elif change == "dtype":
        args = (x.float(), 32, 0.5, (64, 1))
    elif change == "constexpr":
        kwargs = {"BLOCK": 32, "num_warps": 4}
    elif change == "option":
        kwargs = {"BLOCK": 16, "num_warps": 8}
    else:
        grid = (8,)
    fast_launch.launch(kernel, base[2], *base[:2])
    fast_launch.launch(kernel, grid, args, kwargs)
    assert len(kernel.bound) == 2
    assert kernel.compiled.direct == []
    fast_launch.launch(kernel, grid, args, kwargs)  # now that key is known too
    assert len(kernel.bound) == 2
    assert len(kernel.compiled.direct) == 1


def test_no_fast_path_without_a_compiled_kernel_or_for_unknown_arguments():
    interpreted = FakeKernel(returns=None)  # TRITON_INTERPRET=1 returns no compiled kernel
    kernel = FakeKernel()
    x = torch.zeros(64)
    for _ in range(2):
        fast_launch.launch(interpreted, (1,), (x, 32, 0.5, (64, 1)), {"BLOCK": 16})
        fast_launch.launch(kernel, (1,), (x, 32, 0.5, [64, 1]), {"BLOCK": 16})  # a list
        fast_launch.launch(kernel, (1,), (x, 32, 0.5, (64, 1)), {"BLOCK": [16]})  # unhashable
    assert len(interpreted.bound) == 2
    assert len(kernel.bound) == 4
    assert kernel.compiled.direct == []


def test_fast_launch_env_turns_it_off_and_is_checked(monkeypatch):
    kernel = FakeKernel()
    x = torch.zeros(64)
    monkeypatch.setenv("ATTNRT_FAST_LAUNCH", "0")
    for _ in range(2):
        fast_launch.launch(kernel, (1,), (x, 32, 0.5, (64, 1)), {"BLOCK": 16})
    assert len(kernel.bound) == 2
    assert kernel.compiled.direct == []
    monkeypatch.setenv("ATTNRT_FAST_LAUNCH", "yes")
    with pytest.raises(ValueError, match="ATTNRT_FAST_LAUNCH='yes' is not allowed; allowed: 0, 1"):
        fast_launch.launch(kernel, (1,), (x, 32, 0.5, (64, 1)), {"BLOCK": 16})
