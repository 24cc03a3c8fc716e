"""Packaging: the wheel carries capability.yaml and the platform packs; import cost is bounded."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_and_loads_the_manifest(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path), "-q"],
                         capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("attnrt-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "attnrt/capability.yaml" in names
        for pack in ("cpu", "cuda", "rocm", "mps", "npu"):
            assert f"attnrt/platforms/{pack}/probe.py" in names
        assert "attnrt/backends/reference.py" in names
        zf.extractall(tmp_path / "site")
    code = ("from attnrt.selection import manifest as m; man = m.current_manifest(); "
            "assert m.shipped_path().startswith({!r}), m.shipped_path(); "
            "assert man.rules, 'no rules'; print(len(man.rules))".format(str(tmp_path / "site")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""},
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 1


def test_every_package_folder_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {name: ROOT / path for name, path in config["package-dir"].items()}
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            parts = init.parent.relative_to(root).parts
            found.add(".".join((name, *parts)))
    # The wheel ships only listed packages: a folder missing here would be left out of it.
    assert found == listed
