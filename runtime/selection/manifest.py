"""The capability manifest: ranked backend names per platform, arch, head size and dtype.

Rules are read top to bottom and the first whose given keys all match decides. User files (the
`ATTNRT_CAPABILITY` list and `load_capability(path)`) are read before the shipped capability.yaml,
so their rules win. Files are parsed by PyYAML's safe loader (nothing is imported or executed) at
node level, so every error names file:line and the key, and duplicate keys are errors.

    schema: 1
    rules:
      - platform: cuda            # or a list
        arch: ">=sm90"            # names, or ranges such as ">=sm80,<sm100"
        head_size: [64, 128]      # sizes, or ranges such as "<=256"
        dtype: [bf16, fp16]
        causal: false             # optional
        gqa: true                 # optional
        grad: false               # optional: true for calls under autograd (training)
        seq_len: "<=8192"         # optional: query lengths, as head_size takes sizes
        method: vsa               # optional: the attention method ranked (default dense)
        rank: [TORCH_SDPA_CUDNN, TRITON_FLASH_ATTN, TORCH_SDPA, REFERENCE]
        measured: {device: NVIDIA H100 80GB HBM3, date: 2026-11-25, torch: 2.11.0}
        # or  source: "FlashAttention-3 paper, Fig. 5"   (a rule with neither is untested)
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from attnrt.errors import ManifestError
from attnrt.selection import packs, registry
from attnrt.selection.device import Device
from attnrt.selection.manifest_checks import never_served_errors, shadowing_errors
from attnrt.selection.manifest_yaml import (  # noqa: F401  (MAX_*: documented here)
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_NODES,
    Node,
    compose,
    plain,
    read_text,
    strip,
)
from attnrt.selection.methods import DENSE, MethodError, check_method
from attnrt.selection.ranges import ArchRange, RangeError, SizeRange
from attnrt.selection.request import AttentionRequest, dtype_name

SCHEMA = 1
RULE_KEYS = ("method", "platform", "arch", "head_size", "dtype", "causal", "gqa", "grad",
             "seq_len", "rank", "measured", "source", "note")
MEASURED_KEYS = ("device", "date", "torch", "driver", "cuda", "triton", "tflops", "note")


@dataclass(frozen=True)
class Rule:
    file: str
    line: int
    rank: tuple[str, ...]
    platforms: frozenset[str] | None = None
    arch: ArchRange | None = None
    head_size: SizeRange | None = None
    dtypes: frozenset[str] | None = None
    causal: bool | None = None
    gqa: bool | None = None
    grad: bool | None = None
    seq_len: SizeRange | None = None
    # The methods whose implementations the rule ranks; a rule without the key ranks dense ones.
    methods: frozenset[str] = frozenset({DENSE})
    measured: tuple[tuple[str, str], ...] | None = None
    source: str | None = None
    key_lines: tuple[tuple[str, int], ...] = ()

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def line_of(self, key: str) -> int:
        return dict(self.key_lines).get(key, self.line)

    def matches(self, request: AttentionRequest, device: Device,
                any_length: bool = False) -> bool:
        """any_length: whether the rule would match the request at some query length."""
        return (request.method in self.methods
                and (self.platforms is None or device.platform in self.platforms)
                and (self.arch is None or self.arch.contains(device.platform, device.arch))
                and (self.head_size is None or self.head_size.contains(request.head_size))
                and (self.dtypes is None or request.dtype in self.dtypes)
                and (self.causal is None or self.causal == request.causal)
                and (self.gqa is None or self.gqa == request.is_gqa)
                and (self.grad is None or self.grad == request.grad)
                and (self.seq_len is None or any_length
                     or (request.seq_len is not None and self.seq_len.contains(request.seq_len))))

    @property
    def provenance_kind(self) -> str:
        """'measured' (on hardware), 'published' (cited, untested here) or 'untested'."""
        if self.measured is not None:
            return "measured"
        return "published" if self.source is not None else "untested"

    @property
    def provenance(self) -> str:
        if self.measured is not None:
            return "measured: " + ", ".join(f"{k} {v}" for k, v in self.measured)
        if self.source is not None:
            return f"source: {self.source}"
        return "untested"

    def conditions(self) -> str:
        parts = [f"method={','.join(sorted(self.methods))}" if self.methods != {DENSE} else "",
                 f"platform={','.join(sorted(self.platforms))}" if self.platforms else "",
                 f"arch={self.arch}" if self.arch else "",
                 f"head_size={self.head_size}" if self.head_size else "",
                 f"dtype={','.join(sorted(self.dtypes))}" if self.dtypes else "",
                 f"causal={self.causal}" if self.causal is not None else "",
                 f"gqa={self.gqa}" if self.gqa is not None else "",
                 f"grad={self.grad}" if self.grad is not None else "",
                 f"seq_len={self.seq_len}" if self.seq_len else ""]
        return " ".join(p for p in parts if p) or "(any)"


@dataclass(frozen=True)
class Manifest:
    rules: tuple[Rule, ...]
    files: tuple[str, ...]
    signature: tuple[tuple[str, int, int], ...] = ()  # (path, mtime_ns, size): the cache key
    _cuts: dict[tuple[AttentionRequest, Device], tuple[int, ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False)

    def match(self, request: AttentionRequest, device: Device) -> Rule | None:
        for rule in self.rules:
            if rule.matches(request, device):
                return rule
        return None

    def seq_cuts(self, request: AttentionRequest, device: Device) -> tuple[int, ...]:
        """Sorted query lengths where the seq_len test of a rule that can match `request` on
        `device` changes (empty: none has one, so the length never matters to it)."""
        if request.seq_len is not None:
            request = replace(request, seq_len=None)
        cuts = self._cuts.get((request, device))
        if cuts is None:
            cuts = self._cuts[request, device] = tuple(sorted(
                {c for r in self.rules if r.seq_len and r.matches(request, device, True)
                 for c in r.seq_len.cuts()}))
        return cuts

    def seq_span(self, request: AttentionRequest, device: Device) -> tuple[int, float]:
        """[low, high): the query lengths every rule treats as it treats request.seq_len, so a
        decision made for one serves them all. No length: an empty span where a rule that can
        match has a seq_len key (the first real length selects), else every length."""
        cuts = self.seq_cuts(request, device)
        if not cuts:
            return 0, float("inf")
        if request.seq_len is None:
            return 0, 0
        i = bisect.bisect_right(cuts, request.seq_len)
        return (cuts[i - 1] if i else 0), (cuts[i] if i < len(cuts) else float("inf"))


def shipped_path() -> str:
    return str(resources.files("attnrt") / "capability.yaml")


def parse_file(path: str, text: str | None = None) -> list[Rule]:
    """Parse one capability file into rules; structural errors raise ManifestError(file:line)."""
    if text is None:
        text = read_text(path)
    node = compose(text, path)
    if node is None:
        raise ManifestError(f"{path}:1: empty capability file; expected 'schema: 1' and 'rules:'")
    doc = plain(node, path)
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}:{node.start_mark.line + 1}: top level must be a mapping "
                            "with keys schema and rules")
    return _parse_doc(doc, path)


def _parse_doc(doc: dict[str, Node], path: str) -> list[Rule]:
    """The file's rules; ManifestError lists every structural error, one per line."""
    errors = [f"{path}:{item.line}: unknown top-level key {key!r}; allowed: schema, rules"
              for key, item in doc.items() if key not in ("schema", "rules")]
    if "schema" not in doc or doc["schema"].value != SCHEMA:
        line = doc["schema"].line if "schema" in doc else 1
        got = doc["schema"].value if "schema" in doc else None
        errors.append(f"{path}:{line}: schema={got!r} is not supported; allowed: {SCHEMA}")
    rules = doc.get("rules")
    parsed = []
    if rules is None or not isinstance(rules.value, list):
        line = rules.line if rules else 1
        errors.append(f"{path}:{line}: rules must be a list of mappings")
    else:
        for item in rules.value:
            try:
                parsed.append(_parse_rule(item, path))
            except ManifestError as exc:
                errors.extend(str(exc).splitlines())
    if errors:
        raise ManifestError("\n".join(errors))
    return parsed


def _parse_rule(item: Node, path: str) -> Rule:
    if not isinstance(item.value, dict):
        raise ManifestError(f"{path}:{item.line}: each rule must be a mapping with a rank list")
    raw: dict[str, Node] = item.value
    errors = [f"{path}:{node.line}: unknown rule key {key!r}; allowed: {', '.join(RULE_KEYS)}"
              for key, node in raw.items() if key not in RULE_KEYS]
    if "rank" not in raw:
        errors.append(f"{path}:{item.line}: rule has no rank list")
    fields = {}
    for key in raw:
        if key in _FIELD_PARSERS:
            try:
                fields[key] = _field(key, raw[key], path)
            except ManifestError as exc:
                errors.append(str(exc))
    if errors:
        raise ManifestError("\n".join(errors))
    fields["key_lines"] = tuple((k, n.line) for k, n in raw.items())
    return Rule(file=path, line=item.line, **_rename(fields))


def _field(key: str, node: Node, path: str) -> Any:
    where = f"{path}:{node.line}: {key}"
    value = strip(node)
    try:
        return _FIELD_PARSERS[key](value, where)
    except RangeError as exc:
        raise ManifestError(f"{where}: {exc}") from None


def _names(value: Any, where: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) for v in items):
        raise ManifestError(f"{where}: {value!r} must be a name or a non-empty list of names")
    return items


def _platforms(value: Any, where: str) -> frozenset[str]:
    names = _names(value, where)
    bad = [n for n in names if n not in packs.names()]
    if bad:
        raise ManifestError(f"{where}: unknown platform {bad[0]!r}; "
                            f"allowed: {', '.join(packs.names())}")
    return frozenset(names)


def _arch(value: Any, where: str) -> ArchRange:
    arch = ArchRange.parse(_names(value, where))
    for name in arch.names:
        if not any(p.is_arch(name) for p in packs.installed()):
            examples = ", ".join(p.default_arch for p in packs.installed() if p.default_arch)
            raise ManifestError(f"{where}: unknown arch {name!r}; allowed: names such as "
                                f"{examples}, or ranges such as '>=sm80'")
    return arch


def _sizes(key: str, value: Any, where: str) -> SizeRange:
    """head_size or seq_len: positive sizes, or ranges such as '<=256'."""
    items = value if isinstance(value, list) else [value]
    allowed = "positive integers or ranges such as '<=256' or '>=64,<=256'"
    if not items:
        raise ManifestError(f"{where}: [] admits no {key}; allowed: {allowed}")
    sizes = SizeRange.parse(items)
    low, high = sizes.bounds()
    if high < max(low, 1) or any(s < 1 for s in sizes.sizes):
        raise ManifestError(f"{where}: {value!r} admits no {key} or one below 1; allowed: "
                            f"{allowed}")
    return sizes


def _head_size(value: Any, where: str) -> SizeRange:
    return _sizes("head_size", value, where)


def _seq_len(value: Any, where: str) -> SizeRange:
    return _sizes("seq_len", value, where)


def _methods(value: Any, where: str) -> frozenset[str]:
    try:
        return frozenset(check_method(v, "method") for v in _names(value, where))
    except MethodError as exc:
        raise ManifestError(f"{where}: {exc}") from None


def _dtypes(value: Any, where: str) -> frozenset[str]:
    try:
        return frozenset(dtype_name(v) for v in _names(value, where))
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from None


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(f"{where}: {value!r} must be true or false")
    return value


def _rank(value: Any, where: str) -> tuple[str, ...]:
    names = _names(value, where)
    for name in names:
        if not registry.is_registered(name):
            raise ManifestError(f"{where}: unknown backend {name!r}; registered: "
                                f"{', '.join(registry.names())}")
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: {names} names a backend twice")
    return tuple(names)


def _measured(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: must be a mapping with keys among "
                            f"{', '.join(MEASURED_KEYS)}")
    bad = [k for k in value if k not in MEASURED_KEYS]
    if bad:
        raise ManifestError(f"{where}: unknown key {bad[0]!r}; allowed: {', '.join(MEASURED_KEYS)}")
    if "device" not in value:
        raise ManifestError(f"{where}: a measured rule names the device it was measured on")
    return tuple((str(k), _text(v)) for k, v in value.items())


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _source(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{where}: must be a citation string")
    return value


_FIELD_PARSERS = {"method": _methods, "platform": _platforms, "arch": _arch,
                  "head_size": _head_size, "dtype": _dtypes, "causal": _flag, "gqa": _flag,
                  "grad": _flag, "seq_len": _seq_len, "rank": _rank, "measured": _measured,
                  "source": _source}
_FIELD_NAMES = {"platform": "platforms", "dtype": "dtypes", "method": "methods"}


def _rename(rule_fields: dict[str, Any]) -> dict[str, Any]:
    return {_FIELD_NAMES.get(k, k): v for k, v in rule_fields.items()}


# ---------------------------------------------------------------- loading and the current manifest


def validate_files(paths: Iterable[str]) -> list[str]:
    """Every error in these files, as 'file:line: key: message' lines (empty when clean)."""
    errors: list[str] = []
    rules: list[Rule] = []
    for path in paths:
        try:
            rules.extend(parse_file(path))
        except ManifestError as exc:
            errors.extend(str(exc).splitlines())
    errors.extend(shadowing_errors(rules))
    errors.extend(never_served_errors(rules))
    return errors


def load_manifest(paths: Iterable[str]) -> Manifest:
    """Parse and validate files (earlier files win); any error raises ManifestError."""
    paths = tuple(paths)
    rules: list[Rule] = []
    for path in paths:
        rules.extend(parse_file(path))
    errors = shadowing_errors(rules) + never_served_errors(rules)
    if errors:
        raise ManifestError("\n".join(errors))
    return Manifest(tuple(rules), paths)


_lock = threading.Lock()
_api_files: list[str] = []
_cache: dict[tuple[tuple[str, int, int], ...], Manifest] = {}


def load_capability(path: str | os.PathLike[str]) -> Manifest:
    """Add an override file, read before the shipped one; validated now (errors raise)."""
    path = os.fspath(path)
    load_manifest([path, shipped_path()])
    with _lock:
        if path not in _api_files:
            _api_files.insert(0, path)
        _cache.clear()
    return current_manifest()


def manifest_files() -> tuple[str, ...]:
    env = [p for p in os.environ.get("ATTNRT_CAPABILITY", "").split(os.pathsep) if p]
    return (*_api_files, *env, shipped_path())


def _signature(files: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime_ns, size) per file: an edited file (e.g. rewritten by `attnrt tune`) is
    read again, and decisions keyed on this signature are made again."""
    out = []
    for path in files:
        try:
            st = os.stat(path)
            out.append((path, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((path, -1, -1))  # parse_file reports the missing file with its path
    return tuple(out)


def current_manifest() -> Manifest:
    key = _signature(manifest_files())
    with _lock:
        cached = _cache.get(key)
    if cached is None:
        cached = load_manifest(path for path, _, _ in key)
        cached = Manifest(cached.rules, cached.files, key)
        with _lock:
            _cache[key] = cached
    return cached


def clear_manifest_cache(forget_overrides: bool = False) -> None:
    with _lock:
        _cache.clear()
        if forget_overrides:
            _api_files.clear()
