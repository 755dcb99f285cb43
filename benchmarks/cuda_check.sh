#!/usr/bin/env bash
# Every CUDA check in one command, for a session lent a GPU; about 8 minutes on one GPU.
#   benchmarks/cuda_check.sh [--out DIR] [--budget-s S] [--stages env,micro,parity,speed,tests]
#   benchmarks/cuda_check.sh --dry-run      # the same stages on the CPU at small shapes
# Runs benchmarks/cuda_check.py (see its docstring for the stages and limits): one table on stdout,
# cuda_check.json, tests.log and cuda_check.log in DIR (default $OUT, else /tmp/xllama-cuda-check).
# Exit status = verdict: 0 every check passed; 1 a check failed or a stage did not finish (the
# script stops itself at its budget, 470 s; past 500 s it is killed); 2 no CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/xllama-cuda-check}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ ${args[i]} == --out ]] && out=${args[i + 1]:-$out}
done
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv 2>/dev/null
timeout --signal=KILL 500 "$python" benchmarks/cuda_check.py --out "$out" "${args[@]}" 2>&1 \
  | tee "$out/cuda_check.log"
exit "${PIPESTATUS[0]}"
