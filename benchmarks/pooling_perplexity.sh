#!/usr/bin/env bash
# What K/V pooling costs: perplexity of stories260K (8 query heads, 4 KV heads) on a fixed held-out
# text, as trained, as GQA-2 and as MQA, measured with `xllama eval` (default window: the model's
# 512-token context, stride 256). GQA-2/MQA by `mean` are --groups on the fly; `first` and `random`
# (seed 0) go through `xllama convert --method`. Prints a Markdown table.
# Usage: benchmarks/pooling_perplexity.sh [MODEL] [TEXT]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-../shared/fixtures/stories260K-hf}
TEXT=${2:-benchmarks/data/heldout_stories.txt}
XLLAMA=${XLLAMA:-xllama}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

ppl() {  # ppl LABEL KV METHOD -- eval args...
  local label=$1 kv=$2 method=$3; shift 4
  $XLLAMA eval --text "$TEXT" --device cpu --json "$@" |
    python3 -c "import json,sys; d=json.load(sys.stdin); print(f'| $label | $kv | $method | {d[\"perplexity\"]:.3f} | {d[\"tokens_scored\"]} |')"
}

echo "| layout | KV heads | K/V heads built by | perplexity | tokens scored |"
echo "| --- | ---: | --- | ---: | ---: |"
ppl "native (GQA-4)" 4 "-" -- --model "$MODEL"
for g in 2 1; do
  name=$([ "$g" = 1 ] && echo MQA || echo "GQA-$g")
  ppl "$name" "$g" mean -- --model "$MODEL" --groups "$g"
  for method in first random; do
    $XLLAMA convert "$MODEL" --groups "$g" --method "$method" --seed 0 --out "$TMP/$g-$method" 2>/dev/null
    label=$([ "$method" = random ] && echo "random (seed 0)" || echo "$method")
    ppl "$name" "$g" "$label" -- --model "$TMP/$g-$method"
  done
done
