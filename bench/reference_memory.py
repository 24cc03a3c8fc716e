"""Peak memory of REFERENCE (chunked) at N=32768, 8 heads, D=64, fp32 on CPU (goal < 2 GB).

Dense attention would hold 32768^2 * 8 * 4 B = 34 GB of scores. Peak RSS growth is read in a
fresh process so nothing else counts.

    python bench/reference_memory.py [N]
"""

from __future__ import annotations

import subprocess
import sys

CODE = """
import resource, time, torch
from attnrt.backends.reference import chunked_attention
n = {n}
q = torch.randn(1, n, 8, 64); k = torch.randn_like(q); v = torch.randn_like(q)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
out = chunked_attention(q, k, v)
elapsed = time.perf_counter() - t
assert torch.isfinite(out).all()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base // 1024, peak // 1024, elapsed)
"""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    res = subprocess.run([sys.executable, "-c", CODE.format(n=n)], capture_output=True,
                         text=True, check=True)
    base, peak, elapsed = res.stdout.split()
    print(f"REFERENCE N={n} H=8 D=64 fp32 cpu: inputs resident {base} MB, peak RSS {peak} MB, "
          f"growth {int(peak) - int(base)} MB, {float(elapsed):.1f} s (goal: peak < 2048 MB)")


if __name__ == "__main__":
    main()
