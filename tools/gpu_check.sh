#!/usr/bin/env bash
# One prepared GPU check of disttrain: under 7 minutes on one H100 (the checks' limits add up to 7.0 minutes;
# they take less), one line per check, a summary, and a JSON file. What it checks: docs/gpu.md.
#
#   tools/gpu_check.sh [--suite]     (PYTHON=path/to/python, GPU_CHECK_JSON=path/to/results.json)
#
# Without a GPU it prints one line and exits 1 before doing anything. With a GPU and a CPU-only torch, it installs
# the CUDA build of the pinned torch (constraints.txt) from the package registry into .venv-gpu and uses that.
set -euo pipefail
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! command -v nvidia-smi >/dev/null 2>&1 && ! ls /dev/nvidia0 >/dev/null 2>&1; then
  echo "gpu_check: FAILED: no CUDA GPU (no nvidia-smi and no /dev/nvidia0 on this machine); nothing was checked" >&2
  exit 1
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  venv=.venv-gpu
  echo "gpu_check: $PY has no CUDA torch: installing the CUDA build of $(grep '^torch==' constraints.txt) into $venv"
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv"
  fi
  # PyPI's Linux wheel of torch is the CUDA build; the pin keeps it the version this project is tested with.
  "$venv/bin/python" -m pip install -q -c constraints.txt torch -e ".[test]" \
    || { echo "gpu_check: FAILED: could not install the CUDA build of torch into $venv" >&2; exit 1; }
  PY=$venv/bin/python
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: FAILED: torch in $venv sees no CUDA device (driver too old for its CUDA?)" >&2
    exit 1
  fi
fi

exec "$PY" tools/gpu_checks.py --json "${GPU_CHECK_JSON:-gpu_check.json}" "$@"
