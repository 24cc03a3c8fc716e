"""Every buffer the chunked kernel writes starts as NaN, so an element it never wrote fails."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    from attnrt.kernels.linear import chunked

    made: list[torch.Tensor] = []

    def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = torch.full(shape, float("nan"), dtype=dtype, device=device)
        made.append(t)
        return t

    monkeypatch.setattr(chunked, "_alloc", alloc)
    return made
