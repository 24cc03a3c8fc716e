"""Runs Gluon kernels under the CPU emulator on a case list and prints one JSON line per case.

    python -m tests.gluon_emu.run '[{"kind": "dense", ...}, ...]'   (or the list on stdin)

Each line: {"case": ..., "ran": [kernel names launched], "seconds": ..., and the case's
results (cases.py): rel L2 per output / gradient, "lse_inf_match", "nan_left"} or
{"case": ..., "error": "..."}. Exit status: 0 when every case ran, 2 when a case deadlocked
(the error names each stuck partition and the kernel line it waits at), 1 on other errors.
Installs the fake Gluon modules in this process's sys.modules: never import it in pytest.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback


def _run_case(case: dict, kinds: dict) -> tuple[dict, int]:
    from . import fake, sync

    fake.LAUNCHED.clear()
    start = time.monotonic()
    try:
        result, status = kinds[case["kind"]](case), 0
    except sync.Deadlock as exc:
        result, status = {"error": f"deadlock: {exc}"}, 2
    except Exception as exc:  # noqa: BLE001 (reported per case; the runner goes on)
        tb = traceback.format_exc(limit=-6)
        result, status = {"error": f"{exc!r}\n{tb}"}, 1
    result.update(case=case, ran=list(fake.LAUNCHED),
                  seconds=round(time.monotonic() - start, 2))
    return result, status


def main(argv: list[str]) -> int:
    cases = json.loads(argv[1] if len(argv) > 1 else sys.stdin.read())
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("ATTNRT_CACHE_DIR", tempfile.mkdtemp(prefix="gluon-emu-"))
    from . import fake

    fake.install()
    from . import cases as case_kinds

    case_kinds.patch_launches()
    worst = 0
    for case in cases:
        result, status = _run_case(case, case_kinds.KINDS)
        print(json.dumps(result), flush=True)
        worst = max(worst, status)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv))
