"""Reading a capability file from a path that may point at anything (ATTNRT_CAPABILITY,
`attnrt validate FILE`): regular files only, at most MAX_FILE_BYTES, UTF-8, nesting and alias
expansion bounded; each refusal is a ManifestError naming file:line, raised in well under a
second. Then the YAML node graph as plain data whose mappings keep each key's line (`Node`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from attnrt.errors import ManifestError


@dataclass(frozen=True)
class Node:
    """A parsed value and the line it starts on."""

    value: Any
    line: int


# Bounds for files from untrusted paths (ATTNRT_CAPABILITY, `attnrt validate FILE`): each is a
# ManifestError naming the file, raised in well under a second. The shipped file is ~12 KB,
# 5 levels deep.
# The cap keeps the worst case (a file of nothing but tiny nodes) near a second with libyaml
# (PyYAML's C loader, used where installed; the pure-Python one is ~8x slower).
MAX_FILE_BYTES = 256 << 10  # 256 KiB
MAX_DEPTH = 32  # nesting of mappings and sequences
MAX_NODES = 50_000  # nodes after expanding aliases (a 9-level alias bomb expands to 10^9)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than MAX_DEPTH (it recurses per level:
    500 levels gave a bare RecursionError)."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ManifestError(f"{self.name}:{mark.line + 1}: nesting deeper than "
                                    f"{MAX_DEPTH} levels; capability files are a few levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def read_text(path: str) -> str:
    """The file's text: a regular file (not a FIFO, device or directory), at most
    MAX_FILE_BYTES, UTF-8. Opened without blocking, then checked on the open descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ManifestError(f"{path}:0: cannot read capability file: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
            raise ManifestError(f"{path}:0: is {kind}, not a regular file; capability files "
                                "must be regular files")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ManifestError(f"{path}:0: larger than {MAX_FILE_BYTES} bytes (MAX_FILE_BYTES); "
                            "capability files are small text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ManifestError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                            f"offset {exc.start}); capability files are UTF-8") from None


def _line(event: yaml.Event) -> int:
    return event.start_mark.line + 1 if event.start_mark is not None else 1


def _check_depth(text: str, path: str, loader_cls: Any) -> None:
    """The C composer recurses per level too: scan its events for the depth first (cheap),
    and for the node count before any node is built."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=loader_cls):
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise ManifestError(f"{path}:{_line(event)}: more than {MAX_NODES} "
                                    "nodes; capability files are small")
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ManifestError(f"{path}:{_line(event)}: nesting deeper than "
                                    f"{MAX_DEPTH} levels; capability files are a few levels deep")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def compose(text: str, path: str) -> yaml.Node | None:
    fast = getattr(yaml, "CSafeLoader", None)
    loader = fast(text) if fast is not None else _BoundedLoader(text)
    loader.name = path
    try:
        if fast is not None:
            _check_depth(text, path, fast)
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 1
        raise ManifestError(f"{path}:{line}: YAML syntax error: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}:1: YAML error: {exc}") from None
    finally:
        loader.dispose()
    if node is not None:
        _check_expansion(node, path)
    return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expansion(root: yaml.Node, path: str) -> None:
    """Refuse a node graph whose alias expansion exceeds MAX_NODES nodes or MAX_DEPTH levels,
    or that refers to itself. Aliases share nodes, so each node is sized once (iteratively:
    no recursion to overflow)."""
    done: dict[int, tuple[int, int]] = {}  # id -> (expanded size, expanded depth)
    entered: set[int] = set()  # the current path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            entered.discard(key)
            kids = [done[id(c)] for c in _children(node)]
            size, depth = 1 + sum(k[0] for k in kids), 1 + max((k[1] for k in kids), default=0)
            if size > MAX_NODES or depth > MAX_DEPTH:
                raise ManifestError(f"{path}:{node.start_mark.line + 1}: this node holds more "
                                    f"than {MAX_NODES} nodes or {MAX_DEPTH} levels once aliases "
                                    "are expanded; capability files are small")
            done[key] = (size, depth)
        elif key in entered:
            raise ManifestError(f"{path}:{node.start_mark.line + 1}: an alias refers to a node "
                                "that contains it; capability files hold finite plain data")
        elif key not in done:
            entered.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in done)


def plain(node: yaml.Node, path: str) -> Any:
    """A node as plain data, with mappings as {key: Node} so lines survive; duplicates rejected."""
    if node.tag not in SafeConstructor.yaml_constructors:
        raise ManifestError(f"{path}:{node.start_mark.line + 1}: YAML tag {node.tag!r} is not "
                            "allowed; capability files hold plain data only")
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ManifestError(f"{path}:{key_node.start_mark.line + 1}: a mapping key must "
                                    "be a plain name, not a list or mapping")
            key = SafeConstructor().construct_object(key_node, deep=True)
            if key in out:
                raise ManifestError(f"{path}:{key_node.start_mark.line + 1}: duplicate key "
                                    f"{key!r} (first at line {out[key].line})")
            out[key] = Node(plain(value_node, path), key_node.start_mark.line + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [Node(plain(item, path), item.start_mark.line + 1) for item in node.value]
    return SafeConstructor().construct_object(node, deep=True)


def strip(value: Any) -> Any:
    if isinstance(value, Node):
        return strip(value.value)
    if isinstance(value, list):
        return [strip(v) for v in value]
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items()}
    return value
