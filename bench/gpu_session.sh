#!/usr/bin/env bash
# One GPU session for everything that needs the device, in phases that each fit one call:
#   bash bench/gpu_session.sh next    # then next2, next3: what the next session runs first
#   bash bench/gpu_session.sh correct # the gpu tests of the engine, linear, ring, sparse alone
#   bash bench/gpu_session.sh rest    # the sweep, every other gpu test, two tables
#   bash bench/gpu_session.sh tests   # install, all gpu-marked tests (xdist), the CLI on the device
#   bash bench/gpu_session.sh bench   # every benchmark's --quick table, one after another
# Wheels the image lacks (pytest, xdist; fla-core + einops for the linear bench) travel in .whl/.
# Each step has its own time limit, so one slow step cannot eat the call; logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
out=${OUT:-/tmp/attnrt-gpu}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1 \
  || echo "install: editable install failed (see pip.log)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step() {  # step SECONDS NAME COMMAND...: run with a limit, log to $out/NAME.log, print its tail
  local limit=$1 name=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout -s INT -k 15 "$limit" "$@" >"$out/$name.log" 2>&1; echo "rc=$?" >>"$out/$name.log"
  tail -n "${TAIL:-25}" "$out/$name.log"
}
case "${1:-tests}" in
  next)  # what the fourteenth session runs first: the gpu tests no run has reached (ring,
          # linear kernels and fused mods, the flex retry, VMoBA, SLA backward, the rest of the
          # Gluon block-sparse forward), then VSA end to end and SLA/VMoBA with the Gluon
          # kernels on (the thirteenth session's switches)
    TAIL=40 step 220 gpu_tests python3 -m pytest -m gpu -v -rfE --tb=short \
      -p no:cacheprovider -n 16 --maxfail=60 --junitxml="$out/junit.xml" tests/test_ctxvars.py \
      tests/test_ring.py \
      tests/test_ring_grads.py tests/sparse/test_vmoba.py tests/sparse/test_sla_vmoba_gpu.py \
      tests/engine/test_kernel_layouts.py tests/engine/test_fast_tanh.py tests/linear \
      tests/kernels/test_block_sparse_gluon.py \
      tests/kernels/test_block_sparse_plans.py
    step 120 sparse python3 bench/sparse_gpu.py --quick --only parts,vsa,fine,flex
    step 90 sla_vmoba python3 bench/sla_vmoba_gpu.py --quick
    ;;
  next2)  # the second call: fla against ours (fla autotunes per shape: minutes), the engine
           # table (the Flex retry, the Gluon forward on), the model rows with Gluon on
    step 180 linear_fla python3 bench/linear_gpu.py --quick
    step 110 engine python3 bench/engine_gpu.py --quick
    step 100 models python3 bench/models_gpu.py --quick
    ;;
  next3)  # if budget is left: host overhead (issue 18), the engine experiments, every other
           # gpu test (dense flash, block-sparse kernel, the engine's examples)
    step 25 host_overhead python3 bench/host_overhead_gpu.py --quick
    step 50 engine_experiments python3 bench/engine_experiments_gpu.py
    step 80 engine_bwd_tiles python3 bench/engine_experiments_gpu.py --backward
    TAIL=20 step 300 gpu_tests_rest python3 -m pytest -m gpu -q -p no:cacheprovider -n 16 \
      tests/kernels/test_triton_flash.py tests/kernels/test_block_sparse_kernel.py \
      tests/kernels/test_block_sparse_gluon_bwd.py tests/kernels/test_block_sparse_row_mask.py \
      tests/engine tests/sparse/test_vsa.py
    ;;
  correct)  # the gpu tests of the engine, the linear engine, ring and sparse methods alone
    TAIL=40 step "${LIMIT:-140}" gpu_tests python3 -m pytest -m gpu -v -rfE --tb=short \
      -p no:cacheprovider -n 16 --maxfail=40 --junitxml="$out/junit.xml" tests/engine \
      tests/linear tests/test_ring.py tests/test_ring_grads.py tests/sparse
    ;;
  rest)  # the sweep (launch plans for options.py), every gpu test outside the new features,
          # the ring backward and model tables
    step 130 sparse_sweep python3 bench/sparse_gpu.py --quick --sweep --sweep-budget 60 \
      --only sweep,vsa
    TAIL=30 step 200 gpu_tests_rest python3 -m pytest -m gpu -q -p no:cacheprovider -n 8 \
      --maxfail=60 tests --ignore=tests/kernels --ignore=tests/sparse --ignore=tests/engine \
      --ignore=tests/linear --ignore=tests/test_ring.py --ignore=tests/test_ring_grads.py
    step 45 ring_backward python3 bench/ring_backward_gpu.py --quick
    step 60 models python3 bench/models_gpu.py --quick
    ;;
  tests)
    step 60 cli bash -c "python3 -m attnrt.tools.cli info | head -30; python3 -m attnrt.tools.cli explain --head-size 128 --dtype bf16 --heads 40 --method vsa"
    TAIL=40 step 420 gpu_tests python3 -m pytest -m gpu -q -p no:cacheprovider -n 8 --maxfail=60 tests
    ;;
  bench)
    step 140 sparse python3 bench/sparse_gpu.py --quick --sweep --sweep-budget 60
    step 75 sla_vmoba python3 bench/sla_vmoba_gpu.py --quick
    step 80 engine python3 bench/engine_gpu.py --quick
    step 75 linear python3 bench/linear_gpu.py --quick
    step 40 host_overhead python3 bench/host_overhead_gpu.py --quick
    step 60 models python3 bench/models_gpu.py --quick
    step 45 ring_backward python3 bench/ring_backward_gpu.py --quick
    ;;
esac
