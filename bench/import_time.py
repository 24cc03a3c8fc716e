"""`import attnrt` cost on top of `import torch` (goal: at most 150 ms). Median of fresh processes.

    python bench/import_time.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys

CODE = ("import time; import torch; t = time.perf_counter(); import attnrt; "
        "print((time.perf_counter() - t) * 1e3)")


def main(runs: int = 7) -> None:
    times = [float(subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                                  check=True).stdout) for _ in range(runs)]
    print(f"import attnrt after torch: median {statistics.median(times):.1f} ms, "
          f"min {min(times):.1f} ms, max {max(times):.1f} ms over {runs} processes "
          "(goal <= 150 ms)")


if __name__ == "__main__":
    main()
