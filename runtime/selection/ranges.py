"""Arch and size conditions (head size, sequence length): exact names or sizes, or ranges such
as ">=sm80" and "<=256".

A range is one or more comparisons joined by commas (">=sm80,<sm100"). Arch ranges need an order,
which only some platforms have (their pack declares `arch_bases`): CUDA compute capabilities
(sm80 < sm90 < sm100) and ROCm gfx names (gfx90a < gfx942 < gfx950 < gfx1100). Both kinds answer
`contains` and the conservative `covers` (True only when every value the other condition admits
is admitted here), for shadowed rules.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from attnrt.selection import packs
from attnrt.selection.packs import arch_order

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
}
_COMPARISON = re.compile(r"^\s*(>=|<=|>|<|==)\s*([A-Za-z0-9_]+)\s*$")


class RangeError(ValueError):
    """A range expression that cannot be parsed; the caller adds file:line."""


def _comparisons(spec: str) -> list[tuple[str, str]]:
    parts = []
    for piece in spec.split(","):
        m = _COMPARISON.match(piece)
        if m is None:
            raise RangeError(f"range {spec!r} is not understood; write comparisons such as "
                             "'>=sm80' or '>=64,<=256' (operators >=, <=, >, <, ==)")
        parts.append((m.group(1), m.group(2)))
    return parts


def _is_range(item: object) -> bool:
    return isinstance(item, str) and item.strip()[:1] in "<>="


@dataclass(frozen=True)
class ArchRange:
    """A set of arch names: exact names plus ordered ranges (each range on one platform)."""

    names: frozenset[str]
    # (platform, ((operator, arch key), ...)) per range
    ranges: tuple[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]], ...]
    text: str

    @classmethod
    def parse(cls, spec: str | Iterable[str] | ArchRange) -> ArchRange:
        if isinstance(spec, ArchRange):
            return spec
        items = [spec] if isinstance(spec, str) else list(spec)
        names, ranges = set(), []
        for item in items:
            if not isinstance(item, str):
                raise RangeError(f"arch {item!r} is not a name or a range such as '>=sm80'")
            if _is_range(item):
                ranges.append(_parse_arch_range(item))
            else:
                names.add(item.strip().lower())
        text = ", ".join(str(i) for i in items)
        return cls(frozenset(names), tuple(ranges), text)

    def contains(self, platform: str, arch: str) -> bool:
        if arch.lower() in self.names:
            return True
        order = arch_order(arch)
        if order is None or order[0] != platform:
            return False
        return any(p == platform and all(_OPS[op](order[1], key) for op, key in comps)
                   for p, comps in self.ranges)

    def __str__(self) -> str:
        return self.text


def _parse_arch_range(spec: str) -> tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]:
    platforms, comps = set(), []
    for op, value in _comparisons(spec):
        order = arch_order(value)
        if order is None:
            raise RangeError(f"arch range {spec!r}: {value!r} has no order; ranges take arch "
                             f"names of platforms whose arches compare, e.g. "
                             f"{packs.ordered_examples()}")
        platforms.add(order[0])
        comps.append((op, order[1]))
    if len(platforms) != 1:
        raise RangeError(f"arch range {spec!r} mixes platforms {sorted(platforms)}")
    return platforms.pop(), tuple(comps)


@dataclass(frozen=True)
class SizeRange:
    """A set of sizes (head sizes, sequence lengths): exact sizes plus integer ranges."""

    sizes: frozenset[int]
    ranges: tuple[tuple[tuple[str, int], ...], ...]
    text: str

    @classmethod
    def parse(cls, spec: int | str | Iterable[int | str]) -> SizeRange:
        items = [spec] if isinstance(spec, (int, str)) else list(spec)
        sizes, ranges = set(), []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise RangeError(f"{item!r} is not an integer or a range like '<=256'")
            if isinstance(item, int):
                sizes.add(item)
            elif _is_range(item):
                ranges.append(tuple((op, _int(v, item)) for op, v in _comparisons(item)))
            else:
                sizes.add(_int(item, item))
        return cls(frozenset(sizes), tuple(ranges), ", ".join(str(i) for i in items))

    def contains(self, size: int) -> bool:
        return size in self.sizes or any(
            all(_OPS[op](size, v) for op, v in comps) for comps in self.ranges)

    def __contains__(self, size: object) -> bool:
        return isinstance(size, int) and self.contains(size)

    def bounds(self) -> tuple[float, float]:
        """Smallest and largest admitted size (inf when unbounded)."""
        lows: list[float] = [min(self.sizes)] if self.sizes else []
        highs: list[float] = [max(self.sizes)] if self.sizes else []
        for comps in self.ranges:
            lo, hi = _interval(comps)
            lows.append(lo)
            highs.append(hi)
        return min(lows), max(highs)

    def cuts(self) -> set[int]:
        """Where membership can change: every s with contains(s - 1) != contains(s) is here."""
        out = {c for s in self.sizes for c in (s, s + 1)}
        for comps in self.ranges:
            lo, hi = _interval(comps)
            out.update(int(c) for c in (lo, hi + 1) if abs(c) != float("inf"))
        return out

    def __str__(self) -> str:
        return self.text


def _interval(comps: tuple[tuple[str, int], ...]) -> tuple[float, float]:
    lo, hi = float("-inf"), float("inf")
    for op, v in comps:
        if op in (">=", ">", "=="):
            lo = max(lo, v + (1 if op == ">" else 0))
        if op in ("<=", "<", "=="):
            hi = min(hi, v - (1 if op == "<" else 0))
    return lo, hi


def _int(value: str, spec: object) -> int:
    try:
        return int(value)
    except ValueError:
        raise RangeError(f"{spec!r}: {value!r} is not an integer") from None


def describe_sizes(sizes: Collection[int]) -> str:
    """'32..256 step 8' for a range object, else the sorted list."""
    if isinstance(sizes, range):
        return f"{sizes.start}..{sizes[-1]} step {sizes.step}"
    if isinstance(sizes, SizeRange):
        return str(sizes)
    return ", ".join(str(s) for s in sorted(sizes))
