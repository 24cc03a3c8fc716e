"""`attnrt bench` and `attnrt tune` (placeholder until the CUDA pack lands them)."""

from __future__ import annotations

import argparse

BENCH_HELP = "time every available backend on a grid of shapes"
TUNE_HELP = "measure the grid and write an override manifest ranking by what was measured"


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run_bench(args: argparse.Namespace) -> int:
    raise NotImplementedError("attnrt bench is not implemented yet")


def run_tune(args: argparse.Namespace) -> int:
    raise NotImplementedError("attnrt tune is not implemented yet")
