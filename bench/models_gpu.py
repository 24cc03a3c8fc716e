"""A full-size Wan 2.1 1.3B transformer (diffusers' own class, random weights, no download) at
480p: one forward natively and through attnrt; time per forward and the share spent in attention.

Shapes: B batch, N tokens (21 latent frames x 30 x 52 patches = 32760), H 12 heads, D 128.
Each forward makes 60 attention calls (30 layers x self [N x N] + cross [N x 512 text tokens]).

Attention time inside the forward is measured with CUDA events around every attention call
(native: torch SDPA calls, through a TorchFunctionMode; attnrt: the backend function diffusers'
dispatcher calls), summed after one synchronize. The attnrt output is compared with the native
one (relative L2; bf16 through 30 layers, so reported, not asserted).

    python bench/models_gpu.py            # 2 warm-up + 5 timed forwards per path
    python bench/models_gpu.py --quick    # 1 + 2 (well under a minute on an H100)

A third path runs the self-attention through VSA (VideoSparse, sparsity 0.875, zero gate: the
random Wan has no gate_compress projection), the cross-attention dense; its output differs from
native by design (reported).

Last, the per-call cost of routing through attnrt: a small attention call through diffusers'
dispatch_attention_fn, natively and through attnrt, in host microseconds per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=1024)


class EventLog:
    """CUDA event pairs around attention calls; total_ms() after a synchronize."""

    def __init__(self) -> None:
        self.pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def timed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args, **kwargs)
        end.record()
        self.pairs.append((start, end))
        return out

    def total_ms(self) -> float:
        return sum(s.elapsed_time(e) for s, e in self.pairs)


class TimeTorchSdpa(TorchFunctionMode):
    def __init__(self, log: EventLog) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        if func is F.scaled_dot_product_attention:
            return self.log.timed(func, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def build(frames: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16).eval()
    inputs = {"hidden_states": torch.randn(1, 16, frames, 60, 104, device="cuda",
                                           dtype=torch.bfloat16),
              "timestep": torch.tensor([500], device="cuda"),
              "encoder_hidden_states": torch.randn(1, 512, 4096, device="cuda",
                                                   dtype=torch.bfloat16)}
    return model, inputs


def time_forwards(model: torch.nn.Module, inputs: dict[str, Any], warmup: int, repeats: int,
                  attention_log: Callable[[EventLog], Any]) -> dict[str, Any]:
    """Median ms per forward and attention ms per forward (events around each call)."""
    with torch.no_grad():
        for _ in range(warmup):
            out = model(**inputs).sample
        forward_ms, attention_ms = [], []
        for _ in range(repeats):
            log = EventLog()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with attention_log(log):
                out = model(**inputs).sample
            torch.cuda.synchronize()
            forward_ms.append((time.perf_counter() - t0) * 1e3)
            attention_ms.append(log.total_ms())
            calls = len(log.pairs)
    return {"forward_ms": statistics.median(forward_ms),
            "attention_ms": statistics.median(attention_ms), "calls": calls, "out": out}


def native(model: torch.nn.Module, inputs: dict[str, Any], warmup: int,
           repeats: int) -> dict[str, Any]:
    return time_forwards(model, inputs, warmup, repeats, TimeTorchSdpa)


def through_attnrt(model: torch.nn.Module, inputs: dict[str, Any], warmup: int, repeats: int,
                   allowed: tuple[str, ...] | None = None, sparse: Any = None) -> dict[str, Any]:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    from attnrt.integrations import diffusers as attnrt_diffusers

    current: dict[str, EventLog | None] = {"log": None}
    with attnrt_diffusers.enabled(model, supported_attention_backends=allowed,
                                  sparse=sparse) as router:
        key = attnrt_diffusers.dispatcher_backend(model)
        inner = registry._backends[key]

        def timed_backend(*args: Any, **kwargs: Any) -> Any:
            log = current["log"]
            return log.timed(inner, *args, **kwargs) if log else inner(*args, **kwargs)

        registry._backends[key] = timed_backend  # bench only: events around each call

        def attach(log: EventLog) -> Any:
            current["log"] = log
            return nullcontext()

        result = time_forwards(model, inputs, warmup, repeats, attach)
        result["served"] = dict(router.served)
    return result


def vsa_variant(model: torch.nn.Module, inputs: dict[str, Any], warmup: int,
                repeats: int, sparsity: float = 0.875) -> dict[str, Any]:
    """The same forward with the self-attention through VSA (attnrt's diffusers integration,
    VideoSparse with the zero gate: Wan has no gate_compress projection), cross-attention
    dense. The latent is (frames, 60, 104) with Wan's (1, 2, 2) patches."""
    from attnrt.integrations.diffusers import VideoSparse

    frames = inputs["hidden_states"].shape[2]
    sparse = VideoSparse((frames, 60, 104), (1, 2, 2), sparsity)
    return through_attnrt(model, inputs, warmup, repeats, sparse=sparse)


def call_overhead_us(calls: int = 2000) -> dict[str, float]:
    """Host microseconds per dispatch_attention_fn call on a small shape (B1 N256 H12 D128
    bf16): diffusers' native backend vs attnrt's forced to TORCH_SDPA (the same torch call
    underneath, so the difference is the per-call cost of routing through attnrt)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    import attnrt
    from attnrt.integrations import diffusers as attnrt_diffusers

    q = torch.randn(1, 256, 12, 128, device="cuda", dtype=torch.bfloat16)
    holder, _ = build_tiny_holder()
    with attnrt_diffusers.enabled(holder), attnrt.force_backend("TORCH_SDPA"):
        backends = {"native": AttentionBackendName.NATIVE,
                    "attnrt": attnrt_diffusers.dispatcher_backend(holder)}
        result = {}
        with torch.no_grad():
            for name, backend in backends.items():
                for _ in range(50):
                    dispatch_attention_fn(q, q, q, backend=backend)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(calls):
                    dispatch_attention_fn(q, q, q, backend=backend)
                torch.cuda.synchronize()
                result[name] = (time.perf_counter() - t0) / calls * 1e6
    return result


def build_tiny_holder() -> tuple[torch.nn.Module, None]:
    """A one-layer Wan (any diffusers model does): enable() needs a model to route."""
    from diffusers import WanTransformer3DModel

    tiny = {**WAN_1_3B, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
            "ffn_dim": 32, "text_dim": 16, "freq_dim": 16}
    return WanTransformer3DModel(**tiny), None


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed forwards")
    parser.add_argument("--frames", type=int, default=21, help="latent frames (21 = 81 video)")
    parser.add_argument("--backends", default=None, help="attnrt allow-list, comma-separated")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("models_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 1
    warmup, repeats = (1, 2) if args.quick else (2, 5)
    allowed = tuple(args.backends.split(",")) if args.backends else None
    t0 = time.perf_counter()
    model, inputs = build(args.frames)
    n = args.frames * 30 * 52
    print(f"Wan 2.1 1.3B (random weights, bf16) at 480p: N={n} tokens, "
          f"{torch.cuda.get_device_name()}; built in {time.perf_counter() - t0:.1f} s")
    ref = native(model, inputs, warmup, repeats)
    ours = through_attnrt(model, inputs, warmup, repeats, allowed)
    vsa = vsa_variant(model, inputs, warmup, repeats)
    print_table(ref, ours, vsa)
    print(f"attnrt vs native output: rel L2 {rel_l2(ours['out'], ref['out']):.2e} (bf16); "
          f"attnrt + VSA (s=0.875, zero gate, random weights) vs native: "
          f"{rel_l2(vsa['out'], ref['out']):.2e}")
    over = call_overhead_us(500 if args.quick else 2000)
    print(f"per call through dispatch_attention_fn (B1 N256 H12 D128 bf16, host us incl. the "
          f"kernel): native {over['native']:.1f}, attnrt {over['attnrt']:.1f} "
          f"(+{over['attnrt'] - over['native']:.1f} us)")
    return 0


def print_table(ref: dict[str, Any], ours: dict[str, Any], vsa: dict[str, Any]) -> None:
    def served(r: dict[str, Any]) -> str:
        return ",".join(f"{k} x{v}" for k, v in r["served"].items())

    rows = [("native (torch SDPA)", "torch picks", ref), ("attnrt", served(ours), ours),
            ("attnrt + VSA s=0.875", served(vsa), vsa)]
    print(f"{'path':<22} {'backend (calls)':<44} {'ms/fwd':>9} {'attn ms':>9} {'attn %':>7} "
          f"{'calls':>6} {'fwd speed-up':>13}")
    for name, backend, r in rows:
        share = 100 * r["attention_ms"] / r["forward_ms"]
        print(f"{name:<22} {backend:<44} {r['forward_ms']:>9.1f} {r['attention_ms']:>9.1f} "
              f"{share:>6.1f}% {r['calls']:>6} {ref['forward_ms'] / r['forward_ms']:>12.2f}x")


if __name__ == "__main__":
    sys.exit(main())
