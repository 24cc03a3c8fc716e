"""Linear attention on one GPU: attnrt's chunked Triton kernel vs flash-linear-attention (fla).

Shapes: B batch, N sequence, H heads, D head size (Dk = Dv = D); B=1, H=16, D=128, bf16.
Variants: simple_gla (one log-decay per head and token, [B, N, H]: RetNet / Mamba-2 style; fla's
chunk_simple_gla), gla (per key channel, [B, N, H, D]; fla's chunk_gla), linear (no decay; fla's
chunk_linear_attn with normalize=False). Both kernels get the same modded inputs (scale 1).

Columns: forward and forward+backward milliseconds (triton.testing.do_bench median), nominal
TFLOP/s (forward 2*B*H*N*(2*D*D + 64*D): the state products plus the causal half of the 64-token
intra-chunk products; forward+backward 3.5x that), ours/fla time ratios (<= 1.0 means ours is at
least as fast), the growth N=65536 / N=4096 (linear in N: 16x; the issue's bound is 17x), and the
ratio of our time to our dense causal softmax kernel (TRITON_FLASH_ATTN) at N=16384.

Before timing, each kernel is checked against the float64 recurrent reference (N=512): a wrong
one is reported and not timed.

Mod rows (after the variants; --no-mods skips them): elu+1 linear attention (q_mod = k_mod =
elu(x)+1, no decay) through LinearAttentionEngine on the Triton backend, "fused" (fuse_mods=
"kernel": the mods inside the chunked kernels) against "pre-pass" (fuse_mods="eager": PyTorch
ops write modded q, k first, autograd differentiates them) and, without --quick, "compile"
(fuse_mods="compile": one torch.compile'd pre-pass); fused/pre-pass < 1.0 means fusion helps.

    python bench/linear_gpu.py                 # every variant, N = 4096, 16384, 65536
    python bench/linear_gpu.py --quick         # simple_gla only, fewer repeats
    python bench/linear_gpu.py --quick --no-fla   # ours only (< 60 s: fla autotunes per shape)
    python bench/linear_gpu.py --json "$OUT/linear.json"
    python bench/linear_gpu.py --sweep         # launch configs of our kernel (N=16384), then exit
    python bench/linear_gpu.py --quick --no-fla --variants linear   # + the mod rows, fastest

--sweep times each candidate of attnrt.kernels.linear.chunked.CONFIGS (checked first) for
simple_gla ("plain" configs) and gla ("per_channel"), forward+backward, and prints the fastest:
copy it into CONFIGS.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable
from typing import Any

B, H, D = 1, 16, 128
LENGTHS = (4096, 16384, 65536)
DENSE_N = 16384
VARIANTS = ("simple_gla", "gla", "linear")
FLA_FUNCTIONS = {"simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
                 "gla": ("fla.ops.gla", "chunk_gla"),
                 "linear": ("fla.ops.linear_attn", "chunk_linear_attn")}
TOL = 1.5e-2  # bf16 relative L2 against float64
SWEEP_N = 16384
# (BT, BK, BV, num_warps, num_stages[, BT_STATES]); the first of each list is what CONFIGS
# ships. per_channel's BT is the sub-block, BT_STATES the chunk its sequential passes walk
# (BT_STATES == BT: no refinement kernels, four times the sequential steps).
SWEEP = {
    "plain": [(64, 64, 64, 8, 2), (64, 64, 64, 4, 2), (64, 64, 32, 4, 2), (64, 64, 32, 8, 3),
              (64, 128, 64, 8, 2), (32, 64, 64, 4, 2), (64, 64, 64, 8, 3)],
    "per_channel": [(16, 32, 64, 4, 2, 64), (16, 64, 64, 4, 2, 64), (16, 32, 32, 4, 2, 64),
                    (16, 32, 64, 8, 2, 64), (16, 32, 64, 4, 2, 128), (16, 32, 64, 4, 2, 16),
                    (32, 32, 64, 8, 2, 64)],
}
CONFIG_KEYS = ("BT", "BK", "BV", "num_warps", "num_stages", "BT_STATES")


def _inputs(variant: str, n: int, grad: bool) -> list[Any]:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (torch.randn(B, n, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
               * D ** -0.5 for _ in range(3))
    g = None
    if variant == "simple_gla":
        g = F.logsigmoid(torch.randn(B, n, H, device="cuda", generator=gen) + 3)
    elif variant == "gla":
        g = F.logsigmoid(torch.randn(B, n, H, D, device="cuda", generator=gen)) / 16
    tensors = [q, k, v, g]
    return [t.requires_grad_(grad) if t is not None else None for t in tensors]


def _ours(q, k, v, g):  # type: ignore[no-untyped-def]
    from attnrt.kernels.linear.chunked import chunked_linear_attention

    return chunked_linear_attention(q, k, v, g)[0]


def _fla(variant: str) -> Callable[..., Any] | str:
    module_name, attr = FLA_FUNCTIONS[variant]
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, OSError, RuntimeError) as exc:
        return f"import {module_name} failed: {exc}"

    def run(q, k, v, g):  # type: ignore[no-untyped-def]
        if variant == "linear":
            return fn(q, k, v, scale=1.0, normalize=False)[0]
        return fn(q, k, v, g=g, scale=1.0)[0]
    return run


def _check(fn: Callable[..., Any], variant: str) -> float:
    """Relative L2 error of fn's output and input gradients against float64 (N=512)."""
    import torch

    from attnrt.kernels.linear.reference import linear_attention_reference

    tensors = _inputs(variant, 512, True)
    out = fn(*tensors)
    do = torch.randn_like(out)
    leaves = [t for t in tensors if t is not None]
    got = [out, *torch.autograd.grad(out, leaves, do)]
    ref_in = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    ref = linear_attention_reference(*ref_in)[0]
    want = [ref, *torch.autograd.grad(ref, [t for t in ref_in if t is not None], do.double())]
    return max(float((a.detach().double() - b.detach()).norm() / b.detach().norm())
               for a, b in zip(got, want, strict=True))


def _time(fn: Callable[..., Any], variant: str, n: int, backward: bool, reps: int) -> float:
    import torch
    from triton.testing import do_bench

    tensors = _inputs(variant, n, backward)
    leaves = [t for t in tensors if t is not None]
    if not backward:
        with torch.no_grad():
            return float(do_bench(lambda: fn(*tensors), warmup=reps, rep=reps * 10))
    do = torch.randn(B, n, H, D, device="cuda", dtype=torch.bfloat16)
    return float(do_bench(lambda: fn(*tensors).backward(do), warmup=reps, rep=reps * 10,
                          grad_to_none=leaves))


def _dense_ms(backward: bool, reps: int) -> float:
    """TRITON_FLASH_ATTN causal at N=16384, same B, H, D, bf16."""
    import torch
    from triton.testing import do_bench

    from attnrt.backends.triton_flash import triton_flash

    q, k, v = (torch.randn(B, DENSE_N, H, D, device="cuda", dtype=torch.bfloat16)
               .requires_grad_(backward) for _ in range(3))
    if not backward:
        with torch.no_grad():
            return float(do_bench(lambda: triton_flash(q, k, v, True, None), warmup=reps,
                                  rep=reps * 10))
    do = torch.randn_like(q)
    return float(do_bench(lambda: triton_flash(q, k, v, True, None).backward(do), warmup=reps,
                          rep=reps * 10, grad_to_none=[q, k, v]))


def _tflops(n: int, ms: float, backward: bool) -> float:
    flops = 2.0 * B * H * n * (2 * D * D + 64 * D) * (3.5 if backward else 1.0)
    return flops / ms / 1e9


def run_variant(variant: str, lengths: tuple[int, ...], reps: int,
                with_fla: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {"variant": variant, "rows": []}
    fla = _fla(variant) if with_fla else "not asked for (--no-fla)"
    impls: dict[str, Callable[..., Any]] = {"ours": _ours}
    if isinstance(fla, str):
        result["fla"] = fla
    else:
        impls["fla"] = fla
    for name, fn in list(impls.items()):
        err = _check(fn, variant)
        result[f"{name}_err"] = err
        if not err < TOL:
            result[f"{name}_wrong"] = True
            del impls[name]
    for n in lengths:
        row: dict[str, Any] = {"N": n}
        for name, fn in impls.items():
            for backward in (False, True):
                row[f"{name}_{'fb' if backward else 'f'}"] = _time(fn, variant, n, backward, reps)
        result["rows"].append(row)
        _print_row(variant, row)
    return result


def _print_row(variant: str, row: dict[str, Any]) -> None:
    n = row["N"]
    parts = [f"{variant:10s} N={n:6d}"]
    for name in ("ours", "fla"):
        if f"{name}_f" in row:
            f, fb = row[f"{name}_f"], row[f"{name}_fb"]
            parts.append(f"{name}: fwd {f:8.3f} ms ({_tflops(n, f, False):5.1f} TF/s) "
                         f"fwd+bwd {fb:8.3f} ms ({_tflops(n, fb, True):5.1f} TF/s)")
    if "fla_f" in row and "ours_f" in row:
        parts.append(f"ours/fla fwd {row['ours_f'] / row['fla_f']:.2f}x "
                     f"fwd+bwd {row['ours_fb'] / row['fla_fb']:.2f}x")
    print(" | ".join(parts), flush=True)


def summarize(results: list[dict[str, Any]], dense: dict[str, float]) -> None:
    for res in results:
        if res["variant"] == "elu1_mods":
            continue  # printed row by row
        rows = {r["N"]: r for r in res["rows"]}
        print(f"\n{res['variant']}: check rel L2 ours {res.get('ours_err', float('nan')):.1e}"
              + (f", fla {res['fla_err']:.1e}" if "fla_err" in res else f"; fla: {res.get('fla')}"))
        for name in ("ours", "fla"):
            if 4096 in rows and 65536 in rows and f"{name}_fb" in rows[4096]:
                growth = rows[65536][f"{name}_fb"] / rows[4096][f"{name}_fb"]
                print(f"  {name} growth fwd+bwd N=65536/N=4096: {growth:.1f}x (bound 17x)")
        if DENSE_N in rows and "ours_fb" in rows[DENSE_N] and dense:
            print(f"  ours / TRITON_FLASH_ATTN causal at N={DENSE_N}: fwd "
                  f"{rows[DENSE_N]['ours_f'] / dense['f']:.3f}x, fwd+bwd "
                  f"{rows[DENSE_N]['ours_fb'] / dense['fb']:.3f}x (time ratio; dense "
                  f"{dense['f']:.2f} / {dense['fb']:.2f} ms)")


def _elu1(t, io):  # type: ignore[no-untyped-def]
    import torch.nn.functional as F

    return F.elu(t) + 1


def _engine(fuse_mods: str) -> Callable[..., Any]:
    """elu+1 linear attention through LinearAttentionEngine (Triton backend), fuse_mods as
    given; (q, k, v, g) -> out like the other implementations (g must be None)."""
    import torch

    from attnrt.engine.linear import LinearAttentionEngine, meta_tensor

    meta = meta_tensor(B, 1, H, D, dtype=torch.bfloat16)
    engine = LinearAttentionEngine((meta, meta, meta), q_mod=_elu1, k_mod=_elu1,
                                   backend="triton", fuse_mods=fuse_mods)
    return lambda q, k, v, g: engine(q, k, v, g)


def _check_mods(fn: Callable[..., Any]) -> float:
    """Relative L2 error of the elu+1 engine's output and q, k, v gradients (N=512, float64
    reference on the modded inputs)."""
    import torch
    import torch.nn.functional as F

    from attnrt.kernels.linear.reference import linear_attention_reference

    q, k, v, _ = _inputs("linear", 512, True)
    out = fn(q, k, v, None)
    do = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, [q, k, v], do)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = linear_attention_reference(F.elu(q64) + 1, F.elu(k64) + 1, v64, None)[0]
    want = [ref, *torch.autograd.grad(ref, [q64, k64, v64], do.double())]
    return max(float((a.detach().double() - b.detach()).norm() / b.detach().norm())
               for a, b in zip(got, want, strict=True))


def run_mods(lengths: tuple[int, ...], reps: int, paths: tuple[str, ...]) -> dict[str, Any]:
    """The mod rows: fused (fuse_mods="kernel") against the pre-pass paths, elu+1 on q, k."""
    result: dict[str, Any] = {"variant": "elu1_mods", "rows": []}
    impls = {}
    for path in ("kernel", *paths):
        fn = _engine(path)
        err = _check_mods(fn)
        result[f"{path}_err"] = err
        if err < TOL:
            impls[path] = fn
        else:
            print(f"elu1 mods fuse_mods={path!r}: wrong (rel L2 {err:.1e}), not timed")
    for n in lengths:
        row: dict[str, Any] = {"N": n}
        for path, fn in impls.items():
            for backward in (False, True):
                row[f"{path}_{'fb' if backward else 'f'}"] = _time(fn, "linear", n, backward,
                                                                   reps)
        result["rows"].append(row)
        parts = [f"elu1 mods  N={n:6d}"]
        for path in impls:
            f, fb = row[f"{path}_f"], row[f"{path}_fb"]
            label = "fused" if path == "kernel" else "pre-pass" if path == "eager" else path
            parts.append(f"{label}: fwd {f:8.3f} ms ({_tflops(n, f, False):5.1f} TF/s) fwd+bwd "
                         f"{fb:8.3f} ms ({_tflops(n, fb, True):5.1f} TF/s)")
        for path in paths:
            if "kernel_f" in row and f"{path}_f" in row:
                parts.append(f"fused/{'pre-pass' if path == 'eager' else path} fwd "
                             f"{row['kernel_f'] / row[f'{path}_f']:.2f}x fwd+bwd "
                             f"{row['kernel_fb'] / row[f'{path}_fb']:.2f}x")
        print(" | ".join(parts), flush=True)
    return result


def sweep(reps: int) -> None:
    """Time every candidate config of our kernel; a wrong one is reported, not timed."""
    from attnrt.kernels.linear import chunked

    for key, variant in (("plain", "simple_gla"), ("per_channel", "gla")):
        shipped = dict(chunked.CONFIGS[key])
        timed = []
        for cand in SWEEP[key]:
            chunked.CONFIGS[key] = dict(zip(CONFIG_KEYS, cand, strict=False))
            try:
                err = _check(_ours, variant)
                if not err < TOL:
                    print(f"{key} {cand}: wrong (rel L2 {err:.1e})", flush=True)
                    continue
                f = _time(_ours, variant, SWEEP_N, False, reps)
                fb = _time(_ours, variant, SWEEP_N, True, reps)
            except Exception as exc:  # noqa: BLE001 - a config that cannot compile is reported
                print(f"{key} {cand}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            timed.append((fb, f, cand))
            print(f"{key} {cand}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms (N={SWEEP_N})", flush=True)
        chunked.CONFIGS[key] = shipped
        if timed:
            fb, f, cand = min(timed)
            print(f"fastest {key}: {cand} fwd+bwd {fb:.3f} ms (shipped {SWEEP[key][0]}: "
                  f"{next((t[0] for t in timed if t[2] == SWEEP[key][0]), float('nan')):.3f} ms)",
                  flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="simple_gla only, fewer repeats")
    parser.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--sweep", action="store_true", help="time our launch configs, exit")
    parser.add_argument("--no-fla", action="store_true",
                        help="skip flash-linear-attention (its first calls autotune per shape)")
    parser.add_argument("--no-mods", action="store_true",
                        help="skip the mod rows (elu+1 fused into the kernels vs pre-pass)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("attnrt") is None:
        raise SystemExit("attnrt is not installed: run `pip install --no-deps "
                         "--no-build-isolation -e .` in the repo first")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    variants = (args.variants.split(",") if args.variants
                else (("simple_gla",) if args.quick else VARIANTS))
    reps = 5 if args.quick else 20
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; B={B} H={H} D={D} bf16",
          flush=True)
    if args.sweep:
        sweep(reps)
        return 0
    results = [run_variant(v, LENGTHS, reps, not args.no_fla) for v in variants]
    if not args.no_mods:
        paths = ("eager",) if args.quick else ("eager", "compile")
        results.append(run_mods(LENGTHS, reps, paths))
    dense = {"f": _dense_ms(False, reps), "fb": _dense_ms(True, reps)}
    summarize(results, dense)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "dense_ms": dense}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
