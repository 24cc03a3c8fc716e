#!/usr/bin/env bash
# One GPU session for everything that needs the device, in two phases so each fits one call:
#   bash bench/gpu_session.sh tests   # install, the gpu-marked tests (xdist), the CLI on the device
#   bash bench/gpu_session.sh bench   # every benchmark's --quick table, one after another
#   bash bench/gpu_session.sh next    # then next2: what the twelfth session runs first
#   bash bench/gpu_session.sh rest    # after 'all': the sweep, the other gpu tests
#   bash bench/gpu_session.sh all     # when one call is all the budget allows: the new features'
#                                     # gpu tests and the shortest form of each table
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
  tiny)  # a last check on a nearly spent budget: the Gluon forward after the restructure,
          # the block-sparse kernel's launch plans
    TAIL=20 step 110 gpu_tests python3 -m pytest -m gpu -q -p no:cacheprovider -n 8 \
      tests/kernels/test_triton_flash.py::test_gpu_gluon_forward \
      tests/kernels/test_block_sparse_kernel.py
    ;;
  min)  # the least that proves the new kernels on the device: their gpu tests, two tables
    TAIL=30 step 150 gpu_tests python3 -m pytest -m gpu -q -p no:cacheprovider -n 8 \
      --maxfail=80 tests/kernels tests/sparse tests/engine tests/linear tests/test_ring.py \
      tests/test_ring_grads.py
    step 55 sparse python3 bench/sparse_gpu.py --quick --only vsa,fine,flex
    step 50 engine python3 bench/engine_gpu.py --quick
    ;;
  all)
    TAIL=30 step 170 gpu_tests python3 -m pytest -m gpu -q -p no:cacheprovider -n 8 \
      --maxfail=80 tests/kernels tests/sparse tests/engine tests/linear tests/test_ring.py \
      tests/test_ring_grads.py tests/test_hardening_declared.py tests/test_methods.py
    step 60 sparse python3 bench/sparse_gpu.py --quick --only parts,vsa,fine,flex
    step 50 sla_vmoba python3 bench/sla_vmoba_gpu.py --quick
    step 55 engine python3 bench/engine_gpu.py --quick
    step 45 linear python3 bench/linear_gpu.py --quick
    step 20 host_overhead python3 bench/host_overhead_gpu.py --quick
    step 30 models python3 bench/models_gpu.py --quick
    ;;
  final)  # a second call on a short budget: failures named (SIGINT at the limit still prints
           # pytest's summary), the launch-plan sweep, the linear table, two profiles
    TAIL=30 step 170 gpu_tests python3 -m pytest -m gpu -v -rfE --tb=short -p no:cacheprovider \
      -n 16 --maxfail=40 --junitxml="$out/junit.xml" tests/kernels tests/sparse tests/engine \
      tests/linear tests/test_ring.py tests/test_ring_grads.py
    step 130 sparse_sweep python3 bench/sparse_gpu.py --quick --sweep --sweep-budget 80 --only vsa
    step 80 linear python3 bench/linear_gpu.py --quick
    step 35 engine_profile python3 bench/engine_profile_gpu.py
    TAIL=45 step 25 host_overhead python3 bench/host_overhead_gpu.py --quick --profile cprofile
    ;;
  next)  # what the next session runs first (see bench/NOTES-*.md, "next"): the gpu tests
          # run 3 did not reach, the engine experiments, the linear table with time for fla's
          # autotuning, the block-sparse plans after the scalar-entry change
    TAIL=40 step 200 gpu_tests python3 -m pytest -m gpu -v -rfE --tb=short \
      -p no:cacheprovider -n 16 --maxfail=40 --junitxml="$out/junit.xml" tests/engine \
      tests/linear tests/test_ring.py tests/test_ring_grads.py tests/sparse \
      tests/kernels/test_block_sparse_plans.py tests/kernels/test_block_sparse_row_mask.py
    step 60 engine_experiments python3 bench/engine_experiments_gpu.py
    step 150 sparse python3 bench/sparse_gpu.py --quick --sweep --sweep-budget 90 \
      --sweep-blocks 128,128x64 --only parts,vsa,fine,flex
    step 25 host_overhead python3 bench/host_overhead_gpu.py --quick
    ;;
  next2)  # the second call of the next session: the linear tables, VMoBA/SLA, the model rows
    step 60 linear_ours python3 bench/linear_gpu.py --quick --no-fla
    step 180 linear_fla python3 bench/linear_gpu.py --quick  # fla autotunes per shape: minutes
    step 90 sla_vmoba python3 bench/sla_vmoba_gpu.py --quick
    step 120 models python3 bench/models_gpu.py --quick
    ;;
  correct)  # the gpu tests of the engine, the linear engine, ring and sparse methods alone
    TAIL=40 step "${LIMIT:-140}" gpu_tests python3 -m pytest -m gpu -v -rfE --tb=short \
      -p no:cacheprovider -n 16 --maxfail=40 --junitxml="$out/junit.xml" tests/engine \
      tests/linear tests/test_ring.py tests/test_ring_grads.py tests/sparse
    ;;
  rest)  # after 'all': the sweep (launch plans for options.py), every other gpu test, the
          # tables 'all' gave in short form
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
