"""attnrt command line: info | explain | validate | bench | tune | plan-sp. No arguments: `info`.

Every subcommand takes --json for scripts and bug reports. Errors exit non-zero with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from attnrt.errors import AttnrtError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnrt", description=__doc__.splitlines()[0])
    from attnrt import __version__

    parser.add_argument("--version", action="version", version=f"attnrt {__version__}")
    sub = parser.add_subparsers(dest="command")
    info = sub.add_parser("info", help="device, probed platforms, backends, manifest in effect")
    _common(info)
    exp = sub.add_parser("explain", help="which backend a layer would get, and why")
    _common(exp)
    exp.add_argument("--head-size", type=int, required=True,
                     help="D, the size of each attention head (e.g. 128)")
    exp.add_argument("--dtype", default="bf16", help="fp16, bf16, fp32, fp64 (default bf16)")
    exp.add_argument("--heads", type=int, default=1,
                     help="H, query heads the kernel sees (default 1)")
    exp.add_argument("--kv-heads", type=int, default=None,
                     help="Hkv, key/value heads (GQA when fewer than --heads; default: --heads)")
    exp.add_argument("--causal", action="store_true",
                     help="a causal mask (bottom-right aligned); default non-causal")
    exp.add_argument("--grad", action=argparse.BooleanOptionalAction, default=False,
                     help="--grad: a call under autograd (training: a layer selects so whenever "
                          "torch.is_grad_enabled()); --no-grad (default): inference, as under "
                          "torch.no_grad(); rules with a grad key apply accordingly")
    exp.add_argument("--seq-len", type=int, default=None,
                     help="the query length (rules with a seq_len key apply only when given)")
    exp.add_argument("--method", default="dense",
                     help="the attention method: dense (default), vsa, sla, sage_sla, vmoba, "
                          "custom, linear")
    exp.add_argument("--backends", default=None,
                     help="comma-separated allow-list (a layer's supported_attention_backends)")
    val = sub.add_parser("validate", help="check capability files; exit 1 on any error")
    val.add_argument("files", nargs="+", help="capability YAML files to check")
    val.add_argument("--json", action="store_true", help="print JSON")
    from attnrt.parallel import plan
    from attnrt.tools import benchmark, tune

    benchmark.add_bench_arguments(_common(sub.add_parser("bench", help=benchmark.BENCH_HELP)))
    tune.add_tune_arguments(_common(sub.add_parser("tune", help=tune.TUNE_HELP)))
    plan.add_plan_arguments(_common(sub.add_parser("plan-sp", help=plan.PLAN_HELP)))
    return parser


def _common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--device", default=None, help="simulate a device, e.g. cuda:sm90, rocm:gfx942")
    return p


@contextlib.contextmanager
def _device(spec: str | None) -> Iterator[None]:
    if spec is None:
        yield
        return
    from attnrt.selection.device import simulated_device

    with simulated_device(spec):
        yield


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def cmd_info(args: argparse.Namespace) -> int:
    from attnrt.selection.report import format_info, info_dict

    data = info_dict()
    _emit(args, data, format_info(data))
    return 1 if data.get("forced_error") else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from attnrt.selection.dispatch import decide
    from attnrt.selection.request import AttentionRequest

    allowed = tuple(n.strip() for n in args.backends.split(",")) if args.backends else None
    request = AttentionRequest(args.head_size, args.dtype, args.heads, args.kv_heads,
                               args.causal, allowed, args.grad, args.seq_len, args.method)
    decision = decide(request)
    mode = ("training (--grad: a layer called with autograd on)" if args.grad else
            "inference (--no-grad: a layer called under torch.no_grad(); --grad for training)")
    _emit(args, {**decision.to_dict(), "mode": "training" if args.grad else "inference"},
          f"mode:     {mode}\n{decision.explain()}")
    return 0 if decision.backend else 1


def cmd_validate(args: argparse.Namespace) -> int:
    from attnrt.selection.manifest import validate_files

    results = {path: validate_files([path]) for path in args.files}
    if args.json:
        print(json.dumps({"files": results, "ok": not any(results.values())}, indent=2))
    else:
        for path, errors in results.items():
            print(f"{path}: ok" if not errors else "\n".join(errors))
    return 1 if any(results.values()) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["info", *(argv or [])])
    from attnrt.parallel import plan
    from attnrt.tools import benchmark, tune

    commands = {"info": cmd_info, "explain": cmd_explain, "validate": cmd_validate,
                "bench": benchmark.run_bench, "tune": tune.run_tune, "plan-sp": plan.run_plan}
    try:
        with _device(getattr(args, "device", None)):
            return commands[args.command](args)
    except (AttnrtError, ValueError, TypeError, OSError) as exc:
        message = str(exc).splitlines()
        print(f"attnrt: error: {message[0] if message else exc}", file=sys.stderr)
        for line in message[1:]:
            print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
