#!/usr/bin/env bash
# Does the built-in calibration mix generalise? GPTQ on SmolLM2-135M-Instruct calibrated on
# WikiText (second half of wikitext2_test.txt) vs the built-in mix (no --calib), RTN as the
# data-free baseline; ppl on TinyStories valid and on WikiText's first half (held out from the
# WikiText calibration). Usage: benchmarks/calib_mix_bench.sh [OUTDIR] (needs WEIGHTSMITH_SHARED).
set -euo pipefail
OUT=${1:-/tmp/calib_mix_bench}
SAMPLES=${SAMPLES:-32} SEQ=${SEQ:-256} EVAL_TOKENS=${EVAL_TOKENS:-8192} BITS_LIST=${BITS_LIST:-"4 3"}
DATA=${WEIGHTSMITH_SHARED:?}/data
MODEL=$(python -c "from weightsmith.testing import smollm2_dir; print(smollm2_dir())")
mkdir -p "$OUT"
python - "$DATA/wikitext2_test.txt" "$OUT" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
half = len(text) // 2
open(f"{sys.argv[2]}/wiki_first.txt", "w", encoding="utf-8").write(text[:half])
open(f"{sys.argv[2]}/wiki_second.txt", "w", encoding="utf-8").write(text[half:])
PY
evals() {  # name model
  for d in "tinystories:$DATA/tinystories_valid.txt" "wiki_first:$OUT/wiki_first.txt"; do
    weightsmith eval ppl "$2" --data "${d#*:}" --seq-len 512 --max-tokens "$EVAL_TOKENS" \
      --no-progress --json > "$OUT/$1.${d%%:*}.json"
    echo "$1 ${d%%:*} $(python -c "import json,sys; print(json.load(open(sys.argv[1]))['ppl'])" "$OUT/$1.${d%%:*}.json")"
  done
}
evals fp32 "$MODEL"
for B in $BITS_LIST; do
  Q="--bits $B --group-size 64"
  /usr/bin/time -f "%e s %M KB" weightsmith compress quantize "$MODEL" "$OUT/rtn_w$B" --method rtn $Q --no-progress 2> "$OUT/rtn_w$B.time" >/dev/null
  evals "rtn_w$B" "$OUT/rtn_w$B"
  /usr/bin/time -f "%e s %M KB" weightsmith compress quantize "$MODEL" "$OUT/gptq_wiki_w$B" --method gptq $Q \
    --calib "$OUT/wiki_second.txt" --calib-samples "$SAMPLES" --seq-len "$SEQ" --no-progress \
    --report "$OUT/gptq_wiki_w$B.report.json" 2> "$OUT/gptq_wiki_w$B.time" >/dev/null
  evals "gptq_wiki_w$B" "$OUT/gptq_wiki_w$B"
  /usr/bin/time -f "%e s %M KB" weightsmith compress quantize "$MODEL" "$OUT/gptq_mix_w$B" --method gptq $Q \
    --calib-samples "$SAMPLES" --seq-len "$SEQ" --no-progress \
    --report "$OUT/gptq_mix_w$B.report.json" 2> "$OUT/gptq_mix_w$B.time" >/dev/null
  evals "gptq_mix_w$B" "$OUT/gptq_mix_w$B"
  tail -n1 "$OUT"/*_w$B.time
done
