#!/usr/bin/env bash
# One prepared GPU check of disttrain: at most ~8 minutes on one CUDA GPU (the limits below add up to 7.3), every
# number printed.
#
#   tools/gpu_check.sh            (PYTHON=path/to/python to choose the interpreter)
#
# 1. the test suite with CUDA available (GPU cases run, CPU/gloo cases as everywhere);
# 2. the trainer on cuda at W=1 in fp32, bf16 and fp16 against the CPU float64 reference (and, for scale, the
#    same precision on the CPU against that reference);
# 3. disttrain's SyncBatchNorm against torch.nn.SyncBatchNorm on CUDA tensors in an NCCL group of one;
# 4. `disttrain bench step` on the GPU (W=1, fp32 and bf16) and `disttrain bench syncbn` (its gloo/CPU path).
# Without a GPU it prints one line and exits 1 before doing anything.
set -uo pipefail
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: FAILED: no CUDA GPU (torch.cuda.is_available() is False with $PY); nothing was checked" >&2
  exit 1
fi

status=0
section() { echo; echo "=== gpu_check: $*"; }
step() {  # step SECONDS COMMAND...: run with a time limit, remember a failure, go on
  local limit=$1; shift
  timeout "$limit" "$@" || { echo "gpu_check: FAILED (exit $?): $*"; status=1; }
}

section "device"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 supported: {torch.cuda.is_bf16_supported()}')"
section "test suite (limit 210 s)"
step 210 "$PY" -m pytest -q -p no:cacheprovider tests
section "trainer on cuda, W=1, against the CPU float64 reference (limit 60 s)"
step 60 "$PY" tools/gpu_numbers.py trainer
section "SyncBatchNorm against torch.nn.SyncBatchNorm on CUDA, group of one (limit 45 s)"
step 45 "$PY" tools/gpu_numbers.py syncbn
section "bench step on the GPU, W=1, fp32 then bf16 (limit 2 x 40 s)"
step 40 "$PY" -m disttrain bench step --world-sizes 1 --rounds 3 --set train.device=cuda
step 40 "$PY" -m disttrain bench step --world-sizes 1 --rounds 3 --set train.device=cuda --set train.precision=bf16
section "bench syncbn (gloo, CPU tensors: its only path; limit 45 s)"
step 45 "$PY" -m disttrain bench syncbn --iters 20 --world-sizes 2
echo
if [ "$status" -ne 0 ]; then echo "gpu_check: FAILED: see the lines above"; else echo "gpu_check: done"; fi
exit "$status"
