"""Suite-wide setup: Triton interpreter on CPU-only machines, the `gpu` skip hook, clean caches."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so this must run before any test
# module imports a kernel. On a machine without CUDA, Triton kernels run on CPU tensors.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


_ENV_VARS = ("ATTNRT_BACKEND", "FASTVIDEO_ATTENTION_BACKEND", "ATTNRT_CAPABILITY", "ATTNRT_DEVICE",
             "ATTNRT_STRICT", "ATTNRT_FALLBACK", "ATTNRT_SIMULATED_PACKAGES")


@pytest.fixture(autouse=True)
def _fresh_attnrt(monkeypatch: pytest.MonkeyPatch):
    """Each test starts with no attnrt env vars, no overrides and empty caches."""
    import attnrt
    from attnrt.integrations.fastvideo import global_force_attn_backend
    from attnrt.selection.manifest import clear_manifest_cache

    for var in _ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    clear_manifest_cache(forget_overrides=True)
    attnrt.clear_caches()
    yield
    global_force_attn_backend(None)
    clear_manifest_cache(forget_overrides=True)
    attnrt.clear_caches()


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error in float64; NaN anywhere gives inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float64: 1e-12}


@pytest.fixture
def local_packages(monkeypatch: pytest.MonkeyPatch):
    """Simulated devices check their backends' packages against this machine's (as a machine
    with torch alone would select), instead of assuming them installed (the default)."""
    monkeypatch.setenv("ATTNRT_SIMULATED_PACKAGES", "local")


@pytest.fixture
def register():
    """register(name, cls_or_target): registers a backend for this test only."""
    from attnrt.selection.registry import register_backend, unregister_backend

    added: list[str] = []

    def _register(name: str, backend: object) -> object:
        register_backend(name, backend)
        added.append(name)
        return backend

    yield _register
    for name in added:
        unregister_backend(name)


@pytest.fixture
def write_yaml(tmp_path):
    """write_yaml(text, name="rules.yaml") -> path of a file holding text."""

    def _write(text: str, name: str = "rules.yaml") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return _write
