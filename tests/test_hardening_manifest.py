"""Hardening (issue 18): capability files from untrusted paths fail fast, typed and named.

A path in ATTNRT_CAPABILITY or given to `attnrt validate` may point at anything. Before the fix a
FIFO blocked forever, /dev/zero ate memory, a 9-level alias bomb ran for minutes, 500 levels of
nesting gave a bare RecursionError and a non-UTF-8 file a UnicodeDecodeError without the path.
Every test runs under an alarm, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import attnrt
from attnrt.selection import manifest
from attnrt.selection.manifest import current_manifest, parse_file, validate_files
from attnrt.tools.cli import main

HEAD = "schema: 1\nrules:\n"
RULE = "  - platform: cpu\n    rank: [REFERENCE]\n"


@pytest.fixture(autouse=True)
def _alarm() -> Iterator[None]:
    """A hang becomes a TimeoutError after 20 s (a guard against hanging, not a timing test)."""

    def _raise(signum: int, frame: object) -> None:
        raise TimeoutError("capability file handling hung")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "rules.yaml"
    os.mkfifo(fifo)
    with pytest.raises(attnrt.ManifestError, match=rf"{fifo}:0: is a FIFO, not a regular file"):
        parse_file(str(fifo))


def test_a_device_is_refused_without_reading_it() -> None:
    with pytest.raises(attnrt.ManifestError, match="/dev/zero:0: is a device"):
        parse_file("/dev/zero")


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(attnrt.ManifestError, match=f"{tmp_path}:0: "):
        parse_file(str(tmp_path))


def test_a_file_over_the_size_cap_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(HEAD + RULE + "#" * manifest.MAX_FILE_BYTES + "\n")
    with pytest.raises(attnrt.ManifestError, match=rf"{big}:0: larger than 262144 bytes"):
        parse_file(str(big))


def test_a_non_utf8_file_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(HEAD.encode() + b"  - platform: cpu # caf\xe9\n    rank: [REFERENCE]\n")
    with pytest.raises(attnrt.ManifestError, match=rf"{bad}:3: not UTF-8 text \(byte 0xe9"):
        parse_file(str(bad))


def _alias_bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_before_it_expands(write_yaml) -> None:
    with pytest.raises(attnrt.ManifestError, match="more than 50000 nodes or 32 "
                       "levels once aliases are expanded"):
        parse_file(write_yaml(_alias_bomb(9)))


def test_a_self_referring_alias_is_refused(write_yaml) -> None:
    with pytest.raises(attnrt.ManifestError, match="an alias refers to a node that contains it"):
        parse_file(write_yaml("schema: 1\nrules: &r [*r]\n"))


def test_small_aliases_still_work(write_yaml) -> None:
    text = (HEAD + "  - platform: cpu\n    rank: &order [TORCH_SDPA, REFERENCE]\n"
            "  - platform: cuda\n    rank: *order\n")
    rules = parse_file(write_yaml(text))
    assert [r.rank for r in rules] == [("TORCH_SDPA", "REFERENCE")] * 2


def test_deep_nesting_is_a_manifest_error_not_a_recursion_error(write_yaml) -> None:
    with pytest.raises(attnrt.ManifestError, match=r"rules.yaml:\d+: nesting deeper than 32"):
        parse_file(write_yaml("schema: 1\nrules: " + "[" * 500 + "]" * 500 + "\n"))


def test_a_list_as_a_mapping_key_is_refused(write_yaml) -> None:
    with pytest.raises(attnrt.ManifestError, match="a mapping key must be a plain name"):
        parse_file(write_yaml("? [a, b]\n: 1\n"))


def test_capability_env_pointing_at_a_fifo_raises_when_read(tmp_path: Path,
                                                            monkeypatch) -> None:
    fifo = tmp_path / "env.yaml"
    os.mkfifo(fifo)
    monkeypatch.setenv("ATTNRT_CAPABILITY", str(fifo))
    with pytest.raises(attnrt.ManifestError, match="is a FIFO"):
        current_manifest()


BROKEN = (HEAD + "  - platform: cpuu\n    rank: [REFERENCE]\n"
          "  - platform: cpu\n    colour: red\n    rank: [NOPE]\n"
          "  - dtype: fp32\n")


def test_validate_reports_every_structural_error_of_a_file_in_one_run(write_yaml) -> None:
    errors = validate_files([write_yaml(BROKEN)])
    assert len(errors) == 4, errors
    assert "unknown platform 'cpuu'" in errors[0]
    assert "unknown rule key 'colour'" in errors[1]
    assert "unknown backend 'NOPE'" in errors[2]
    assert "rule has no rank list" in errors[3]
    assert [e.split(":")[1] for e in errors] == ["3", "6", "7", "8"]


def test_validate_command_prints_every_error(write_yaml, capsys) -> None:
    path = write_yaml(BROKEN)
    assert main(["validate", path]) == 1
    out = capsys.readouterr().out
    assert out.count(path) == 4


def test_a_file_of_too_many_nodes_is_refused_before_building_them(write_yaml) -> None:
    text = "schema: 1\nrules: [" + "1, " * (manifest.MAX_NODES + 1) + "]\n"
    with pytest.raises(attnrt.ManifestError, match=r"rules.yaml:2: more than 50000 nodes"):
        parse_file(write_yaml(text))
