"""Linear-attention variants shared by the kernel, engine and GPU tests.

Shapes: B batch, N sequence, H heads, Dk/Dv head sizes; q, k [B, N, H, Dk], v [B, N, H, Dv].
Each case builds (engine kwargs, decay, custom tensors) from a generator; random, never zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attnrt.engine.linear import CustomIO


def elu1(t: torch.Tensor, io: CustomIO) -> torch.Tensor:
    return F.elu(t) + 1


def relu(t: torch.Tensor, io: CustomIO) -> torch.Tensor:
    return F.relu(t)


def head_softmax(t: torch.Tensor, io: CustomIO) -> torch.Tensor:
    """SLA's feature map: a softmax over the head dim."""
    return torch.softmax(t, dim=-1)


def log(t: torch.Tensor, io: CustomIO) -> torch.Tensor:
    return t.log()


def scaled(t: torch.Tensor, io: CustomIO) -> torch.Tensor:
    return t * (1.0 / math.sqrt(t.shape[-1]))


def mamba_decay(t: torch.Tensor, io: CustomIO) -> torch.Tensor:
    """Mamba-2: log-decay = dt * A (A < 0 per head, dt > 0 per head and token)."""
    return t * io.input_tensors["A"]


def mamba_k(t: torch.Tensor, io: CustomIO) -> torch.Tensor:
    return t * io.input_tensors["dt"][..., None]


@dataclass(frozen=True)
class Case:
    name: str
    mods: tuple[tuple[str, Any], ...] = ()
    decay: str = "none"  # none | head (RetNet factors [H]) | token ([B,N,H] log) | channel
    custom: bool = False

    def build(self, b: int, n: int, h: int, dk: int, gen: torch.Generator, device: str = "cpu",
              ) -> tuple[dict[str, Any], torch.Tensor | None, list[torch.Tensor]]:
        kwargs = dict(self.mods)
        decay = None
        if self.decay == "head":  # RetNet: 1 - 2^(-5 - i) per head, through decay_mod=log
            decay = 1 - torch.exp2(-5.0 - torch.arange(h, dtype=torch.float32))
        elif self.decay == "token":
            decay = F.logsigmoid(torch.randn(b, n, h, generator=gen) + 3)
        elif self.decay == "channel":  # GLA gates, normalised as GLA does (/ 16)
            decay = F.logsigmoid(torch.randn(b, n, h, dk, generator=gen)) / 16
        custom: list[torch.Tensor] = []
        if self.custom:
            kwargs["custom_io"] = CustomIO({"A": (h,), "dt": (b, n, h)})
            custom = [-torch.rand(h, generator=gen) - 0.5,
                      F.softplus(torch.randn(b, n, h, generator=gen) - 2)]
            decay = F.softplus(torch.randn(b, n, h, generator=gen) - 2)  # dt (Mamba-2 init range)
        moved = [t.to(device) for t in custom]
        return kwargs, (decay.to(device) if decay is not None else None), moved


CASES = [
    Case("retnet", (("q_mod", scaled), ("decay_mod", log)), decay="head"),
    Case("simple_gla", (("q_mod", scaled),), decay="token"),
    Case("gla", (("q_mod", scaled),), decay="channel"),
    Case("elu1", (("q_mod", elu1), ("k_mod", elu1))),
    Case("relu", (("q_mod", relu), ("k_mod", relu), ("v_mod", relu))),
    Case("sla_softmax", (("q_mod", head_softmax), ("k_mod", head_softmax))),
    Case("mamba2", (("decay_mod", mamba_decay), ("k_mod", mamba_k)), decay="token",
         custom=True),
]


def qkv(b: int, n: int, h: int, dk: int, dv: int, dtype: torch.dtype, gen: torch.Generator,
        device: str = "cpu") -> list[torch.Tensor]:
    # Scaled so undecayed sums over N stay O(1) per element: fp16 keeps its precision.
    shapes = ((b, n, h, dk), (b, n, h, dk), (b, n, h, dv))
    return [(torch.randn(s, generator=gen) * 0.5).to(dtype).to(device) for s in shapes]


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))
