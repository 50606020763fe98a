#!/usr/bin/env bash
# The checks that need a GPU, in one run (a machine with CUDA, nvcc and TVM built with CUDA):
# the cuda tests (branch-and-bound's searches on the GPU among them), a few random plans per
# (model, method) on the GPU against the torch backend, and benchmarks/bench_gpu.py. Logs and
# the CSV go to ${1:-gpu_checks} (created). Each step stops at its own limit (TEST_SECONDS,
# BENCH_SECONDS, SWEEP_SECONDS) so the rest still runs.
#     tools/gpu_checks.sh [OUT_DIR]
set -u -o pipefail
out=${1:-gpu_checks}
mkdir -p "$out"
export TVM_CUDA_COMPILE_MODE=nvcc PYTHONUNBUFFERED=1
export BOUNDFLOW_CACHE=${BOUNDFLOW_CACHE:-$(mktemp -d)}
status=0
nvidia-smi -L | tee "$out/device.txt"
python3 -c "import tvm, torch; print('tvm', tvm.__version__, 'cuda', tvm.cuda(0).exist,
'torch', torch.__version__, torch.cuda.is_available())" | tee -a "$out/device.txt" || exit 1
timeout "${TEST_SECONDS:-300}" python3 -m pytest -q -p no:cacheprovider tests/backend/test_relax.py \
    tests/backend/test_torch_backend.py tests/test_bad_inputs.py tests/bab/test_target.py \
    -k "cuda or gpu" 2>&1 \
    | tail -15 | tee "$out/pytest_cuda.txt" || status=1
timeout "${BENCH_SECONDS:-600}" python3 benchmarks/bench_gpu.py --csv "$out/bench_gpu.csv" 2>&1 | grep -v "Warning" \
    | tee "$out/bench_gpu.txt" || status=1
timeout "${SWEEP_SECONDS:-120}" python3 tools/relax_sweep.py --target cuda --plans 3 \
    --models digits_cnn,random_residual --methods crown-ibp,crown 2>&1 | grep -v "Warning" \
    | tee "$out/sweep_cuda.txt" || status=1
exit $status
