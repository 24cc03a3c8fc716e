"""Bad input to LinearAttentionEngine: typed errors naming the argument and what is allowed,
raised before any kernel runs."""

from __future__ import annotations

import pytest
import torch

from attnrt.engine import linear_backends
from attnrt.engine.linear import CustomIO, LinearAttentionEngine, meta_tensor
from attnrt.errors import AttnrtError, BackendUnavailableError
from attnrt.kernels.linear import (
    LinearAttentionDeviceError,
    LinearAttentionError,
    LinearAttentionTypeError,
    ModShapeError,
)
from tests.linear.cases import log

B, N, H, D = 1, 6, 2, 4


def _qkv(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, N, H, D, generator=gen, dtype=dtype) for _ in range(3)]


def _engine(**kwargs):
    meta = tuple(meta_tensor(B, N, H, D, dtype=torch.float32) for _ in range(3))
    return LinearAttentionEngine(meta, **kwargs)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts runs of every backend: a refused call must leave it at zero."""
    calls: list[int] = []
    for name, run in list(linear_backends.RUNNERS.items()):
        def counted(*args, _run=run, **kwargs):
            calls.append(1)
            return _run(*args, **kwargs)
        monkeypatch.setitem(linear_backends.RUNNERS, name, counted)
    return calls


def test_errors_are_typed() -> None:
    assert issubclass(LinearAttentionError, AttnrtError)
    assert issubclass(LinearAttentionError, ValueError)
    assert issubclass(LinearAttentionTypeError, TypeError)
    assert issubclass(ModShapeError, LinearAttentionError)
    assert issubclass(LinearAttentionDeviceError, ValueError)


@pytest.mark.parametrize("shape", [(B, N), (H + 1,), (B, N, H, D + 1), (B, N + 1, H)])
def test_decay_of_the_wrong_shape(shape, kernel_calls) -> None:
    with pytest.raises(LinearAttentionError, match=r"decay shape=.*allowed: \[2\], \[1, 6, 2\]"):
        _engine()(*_qkv(), -torch.rand(shape))
    assert kernel_calls == []


@pytest.mark.parametrize("factor", [1.5, 0.0, -0.3, float("nan")])
def test_decay_factor_outside_zero_one(factor, kernel_calls) -> None:
    decay = torch.full((H,), 0.9)
    decay[1] = factor
    with pytest.raises(LinearAttentionError, match=r"finite log-decays <= 0 \(factors in"):
        _engine(decay_mod=log)(*_qkv(), decay)
    assert kernel_calls == []


def test_factor_given_as_log_decay_names_the_fix() -> None:
    with pytest.raises(LinearAttentionError, match=r"decay_mod=lambda d, io: d.log\(\)"):
        _engine()(*_qkv(), torch.full((H,), 0.9))


def test_mod_that_changes_shape_is_refused_when_traced() -> None:
    with pytest.raises(ModShapeError, match=r"k_mod changed the shape \(1, 6, 2, 4\) to "
                                            r"\(1, 6, 2\)"):
        _engine(k_mod=lambda t, io: t.sum(-1))


def test_decay_mod_that_changes_shape_is_refused_at_call(kernel_calls) -> None:
    with pytest.raises(ModShapeError, match="decay_mod changed the shape"):
        _engine(decay_mod=lambda d, io: d.log()[..., None])(*_qkv(), torch.full((H,), 0.9))
    assert kernel_calls == []


def test_mod_returning_no_tensor() -> None:
    with pytest.raises(ModShapeError, match="q_mod returned float"):
        _engine(q_mod=lambda t, io: 1.0)


@pytest.mark.parametrize(("state", "error", "match"), [
    (torch.zeros(B, H, D, D + 1), LinearAttentionError, r"initial_state shape=\(1, 2, 4, 5\)"),
    (torch.zeros(B, H, D, D, dtype=torch.float16), LinearAttentionTypeError,
     "initial_state dtype=torch.float16 is not allowed; allowed: torch.float32"),
    (torch.zeros(B, H, D, D, device="meta"), LinearAttentionDeviceError,
     "initial_state device=meta"),
])
def test_bad_states(state, error, match, kernel_calls) -> None:
    with pytest.raises(error, match=match):
        _engine()(*_qkv(), None, initial_state=state)
    with pytest.raises(error, match=match.replace("initial_state", "state")):
        _engine().step(*(t[:, :1] for t in _qkv()), None, state)
    assert kernel_calls == []


def test_custom_input_on_another_device(kernel_calls) -> None:
    engine = _engine(custom_io=CustomIO({"s": (H,)}),
                     q_mod=lambda t, io: t * io.input_tensors["s"][:, None])
    with pytest.raises(LinearAttentionDeviceError, match=r"custom input 's' device=meta"):
        engine(*_qkv(), None, [torch.ones(H, device="meta")])
    with pytest.raises(LinearAttentionError, match=r"allowed: 1 tensors named \['s'\]"):
        engine(*_qkv(), None, [])
    assert kernel_calls == []


def test_inputs_that_disagree_with_qkv_meta() -> None:
    with pytest.raises(LinearAttentionTypeError, match="q dtype=torch.float16"):
        _engine()(*_qkv(torch.float16), None)
    q, k, v = _qkv()
    with pytest.raises(LinearAttentionError, match=r"v shape=\(1, 6, 2, 3\).*\[B, N, 2, 4\]"):
        _engine()(q, k, v[..., :3], None)


def test_decay_on_a_non_causal_engine() -> None:
    with pytest.raises(LinearAttentionError, match="causal=False engine"):
        _engine(causal=False)(*_qkv(), -torch.rand(H))


def test_unknown_backend_and_unavailable_fla(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LinearAttentionError, match="backend='cudnn' is not allowed"):
        _engine(backend="cudnn")
    monkeypatch.setattr(linear_backends, "fla_functions", lambda: "import fla.ops failed: x")
    with pytest.raises(BackendUnavailableError, match=r"backend='fla' cannot run.*pip install"):
        _engine(backend="fla")(*_qkv(), None)


def test_bad_qkv_meta() -> None:
    with pytest.raises(LinearAttentionTypeError, match=r"qkv_meta=.*allowed: a tuple of three"):
        LinearAttentionEngine(meta_tensor(B, N, H, D))
    mixed = (meta_tensor(B, N, H, D), meta_tensor(B, N, H, D, dtype=torch.float32),
             meta_tensor(B, N, H, D))
    with pytest.raises(LinearAttentionTypeError, match=r"qkv_meta dtypes=.* for all three"):
        LinearAttentionEngine(mixed)
    with pytest.raises(LinearAttentionError, match=r"qkv_meta shapes=.*q and k \[B, N, H, Dk\]"):
        LinearAttentionEngine((meta_tensor(B, N, H, D), meta_tensor(B, N, H, D + 1),
                               meta_tensor(B, N, H, D)))


def test_step_refusals() -> None:
    q, k, v = _qkv()
    state = torch.zeros(B, H, D, D)
    with pytest.raises(LinearAttentionError, match=r"q shape=\(1, 6, 2, 4\) is not allowed"):
        _engine().step(q, k, v, None, state)
    with pytest.raises(LinearAttentionError, match="state=None is not allowed in step"):
        _engine().step(q[:, :1], k[:, :1], v[:, :1], None, None)
    with pytest.raises(LinearAttentionError, match="causal=False engine"):
        _engine(causal=False).step(q[:, :1], k[:, :1], v[:, :1], None, state)
