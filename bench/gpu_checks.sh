#!/usr/bin/env bash
# One call on the GPU machine: install, the gpu-marked tests, and the CLI on the real device.
# Usage (device tool, repo root): bash bench/gpu_checks.sh "$OUT"
# Wheels for pytest/xdist, if the image lacks them, are carried in .whl-flash/ (see the
# device README); the repo is installed editable, or put on PYTHONPATH through a shim when
# the image's setuptools cannot do an editable install offline.
set -uo pipefail
out=${1:-/tmp/attnrt-gpu}
mkdir -p "$out"
if [ -d .whl-flash ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl-flash/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# sageattention 1.0.6 (Triton only, pure Python) runs SAGE_ATTN for real when carried in .whl-sage/.
if [ -d .whl-sage ]; then
  python3 -m pip install -q --no-index --no-deps .whl-sage/*.whl >>"$out/pip.log" 2>&1 \
    && echo "install: sageattention from .whl-sage"
fi
if python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1; then
  echo "install: pip install -e . worked"
else
  mkdir -p /tmp/shim && cp -rL runtime /tmp/shim/attnrt && cp -rL platforms /tmp/shim/attnrt/platforms
  export PYTHONPATH=/tmp/shim:$PWD:$PYTHONPATH
  echo "install: editable install failed (see pip.log); using a PYTHONPATH shim"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m attnrt.tools.cli info >"$out/info.txt" 2>&1; head -12 "$out/info.txt"
python3 -m attnrt.tools.cli explain --head-size 128 --dtype bf16 --heads 24 | tee "$out/explain.txt"
python3 -m attnrt.tools.cli explain --head-size 72 --dtype fp16 --heads 24 --kv-heads 8 --causal
python3 -m attnrt.tools.cli explain --head-size 64 --dtype bf16 --heads 24 --causal --seq-len 4096
python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider --maxfail=20 2>&1 | tee "$out/gpu_tests.log" | tail -15
python3 -m attnrt.tools.cli bench --head-sizes 64,128 --seq-lens 4096 --dtypes bf16 --causal both \
  --out "$out/bench.json" 2>/dev/null | tee "$out/bench.txt"
python3 bench/dispatch_overhead.py | tee "$out/dispatch.txt"
