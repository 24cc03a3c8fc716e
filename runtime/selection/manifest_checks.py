"""Whole-manifest checks: rules shadowed by an earlier rule, and ranks a backend can never serve.

Both are conservative: "shadowed" is reported only when every request the later rule matches is
provably matched by the earlier one; "never served" only when the backend's declared capability
excludes every request the rule can match.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from attnrt.errors import RegistryError
from attnrt.selection import registry
from attnrt.selection.capability import declared
from attnrt.selection.packs import arch_order
from attnrt.selection.ranges import ArchRange, SizeRange

if TYPE_CHECKING:
    from attnrt.selection.manifest import Rule

Bound = tuple[Any, bool] | None  # (value, inclusive) or unbounded


def _interval(comps: tuple[tuple[str, Any], ...]) -> tuple[Bound, Bound]:
    low: Bound = None
    high: Bound = None
    for op, v in comps:
        if op in (">=", ">", "=="):
            cand = (v, op != ">")
            if low is None or cand[0] > low[0] or (cand[0] == low[0] and not cand[1]):
                low = cand
        if op in ("<=", "<", "=="):
            cand = (v, op != "<")
            if high is None or cand[0] < high[0] or (cand[0] == high[0] and not cand[1]):
                high = cand
    return low, high


Comparisons = tuple[tuple[str, Any], ...]


def _interval_covers(outer: Comparisons, inner: Comparisons) -> bool:
    (olo, ohi), (ilo, ihi) = _interval(outer), _interval(inner)
    low_ok = olo is None or (ilo is not None and (olo[0] < ilo[0] or (
        olo[0] == ilo[0] and (olo[1] or not ilo[1]))))
    high_ok = ohi is None or (ihi is not None and (ohi[0] > ihi[0] or (
        ohi[0] == ihi[0] and (ohi[1] or not ihi[1]))))
    return low_ok and high_ok


def _sizes_cover(outer: SizeRange, inner: SizeRange) -> bool:
    return (all(outer.contains(s) for s in inner.sizes)
            and all(any(_interval_covers(o, i) for o in outer.ranges) for i in inner.ranges))


def _arch_covers(outer: ArchRange, inner: ArchRange) -> bool:
    def has(name: str) -> bool:
        order = arch_order(name)
        return name in outer.names or (order is not None and outer.contains(order[0], name))

    return (all(has(n) for n in inner.names)
            and all(any(op == ip and _interval_covers(oc, ic) for op, oc in outer.ranges)
                    for ip, ic in inner.ranges))


def _key_covers(key: str, outer: Any, inner: Any) -> bool:
    if outer is None:
        return True
    if inner is None:
        return False
    if key == "arch":
        return _arch_covers(outer, inner)
    if key in ("head_size", "seq_len"):
        return _sizes_cover(outer, inner)
    if isinstance(outer, frozenset):
        return inner <= outer
    return bool(outer == inner)


_KEYS = ("methods", "platforms", "arch", "head_size", "dtypes", "causal", "gqa", "grad", "seq_len")


def rule_covers(earlier: Rule, later: Rule) -> bool:
    return all(_key_covers(k, getattr(earlier, k), getattr(later, k)) for k in _KEYS)


def shadowing_errors(rules: list[Rule]) -> list[str]:
    """Rules shadowed by an earlier rule of the same file (overriding other files is the point)."""
    errors = []
    for j, later in enumerate(rules):
        for earlier in (r for r in rules[:j] if r.file == later.file):
            if rule_covers(earlier, later):
                errors.append(f"{later.where}: rule ({later.conditions()}) is shadowed by the "
                              f"earlier rule at {earlier.where} ({earlier.conditions()}) and can "
                              "never match")
                break
    return errors


def never_served_errors(rules: list[Rule]) -> list[str]:
    errors = []
    for rule in rules:
        for name in rule.rank:
            try:
                cls = registry.load(name)
            except RegistryError as exc:
                errors.append(f"{rule.file}:{rule.line_of('rank')}: rank: {exc}")
                continue
            why = _never_serves(cls, rule)
            if why:
                errors.append(f"{rule.file}:{rule.line_of('rank')}: rank: {name} can never serve "
                              f"this rule: {why}")
    return errors


def _never_serves(cls: type, rule: Rule) -> str:
    methods = declared(cls, "METHODS")
    if not rule.methods & set(methods):
        return (f"it implements method {', '.join(sorted(methods))}, the rule ranks "
                f"{', '.join(sorted(rule.methods))}")
    platforms = declared(cls, "PLATFORMS")
    if rule.platforms and platforms is not None and not rule.platforms & set(platforms):
        return f"it runs on {', '.join(sorted(platforms))} only"
    dtypes = declared(cls, "DTYPES")
    if rule.dtypes and not rule.dtypes & set(dtypes):
        return f"it supports dtypes {', '.join(sorted(dtypes))} only"
    sizes = declared(cls, "HEAD_SIZES")
    if rule.head_size is not None and sizes is not None and _no_size_overlap(rule.head_size, sizes):
        return f"none of head_size {rule.head_size} is supported"
    if rule.causal and not declared(cls, "SUPPORTS_CAUSAL"):
        return "it does not support causal=True"
    if rule.gqa and not declared(cls, "SUPPORTS_GQA"):
        return "it does not support GQA"
    archs = declared(cls, "ARCHS")
    if rule.arch is not None and archs is not None and rule.arch.names and not rule.arch.ranges:
        supported = ArchRange.parse(archs)
        if not any(_arch_in(supported, n, rule) for n in rule.arch.names):
            return f"none of arch {rule.arch} is in its supported {supported}"
    return ""


def _arch_in(supported: ArchRange, name: str, rule: Rule) -> bool:
    order = arch_order(name)
    platforms = [order[0]] if order else sorted(rule.platforms or ())
    return any(supported.contains(p, name) for p in platforms) or name in supported.names


def _no_size_overlap(rule_sizes: SizeRange, sizes: Collection[int]) -> bool:
    if isinstance(sizes, SizeRange):
        return False  # two open ranges: too loose to prove anything
    return not any(rule_sizes.contains(s) for s in sizes)
