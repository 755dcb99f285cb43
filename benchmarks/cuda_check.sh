#!/usr/bin/env bash
# Every CUDA check in one call, for a session lent a GPU:
#   1. the CUDA tests (tokens against transformers, compiled step with CUDA graphs, int8) and the
#      speed-path tests, on the GPU;
#   2. decode of the llama2-7b bench preset at batch 1 in bfloat16: eager, --compile (CUDA graphs)
#      and --quantize int8 --compile, each against the GPU's bandwidth measured in the same run
#      (target: >= 75% with --compile).
# Usage: benchmarks/cuda_check.sh [OUTDIR]   (JSON results and logs go to OUTDIR, default $OUT or /tmp)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/xllama-cuda-check}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))" || exit 2
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null

python3 -m pytest -q -rs tests/test_cuda.py tests/test_fast_paths.py tests/test_quantize.py 2>&1 | tee "$out/tests.log"
status=${PIPESTATUS[0]}

run() {  # NAME FLAGS...
  local name=$1; shift
  python3 -m xllama_cli bench --preset llama2-7b --device cuda --dtype bfloat16 --groups 32 --batch 1 \
      --input-len 128 --output-len 256 --repeats 3 --out "$out/bench-$name.json" --force "$@" 2>&1 | tee "$out/bench-$name.log"
}
run eager
run compiled --compile
run int8-compiled --quantize int8 --compile

python3 - "$out" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("bench-*.json")):
    d = json.loads(f.read_text())
    for r in d["rows"]:
        frac = r.get("bandwidth_fraction")
        print(f"{f.stem:24s} decode {r.get('decode_tokens_per_s') or 0:7.1f} tok/s  {r.get('decode_gbs') or 0:7.1f} GB/s  "
              f"{'-' if frac is None else f'{100 * frac:.0f}%'} of {d['memory_bandwidth']['gbs']:.0f} GB/s"
              + ("  (target 75%: " + ("met" if frac and frac >= 0.75 else "NOT met") + ")" if "compiled" in f.stem else ""))
PY
exit "$status"
