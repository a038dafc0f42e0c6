#!/usr/bin/env bash
# Does the built-in calibration mix generalise? GPTQ on SmolLM2-135M-Instruct calibrated on
# WikiText (second half of wikitext2_test.txt) vs the built-in mix (no --calib), RTN as the
# data-free baseline; ppl on TinyStories valid and on WikiText's first half (held out from the
# WikiText calibration). Quantizations run in parallel, then the evaluations (a shared machine:
# wall times are not comparable). Usage: benchmarks/calib_mix_bench.sh [OUTDIR]
# (needs WEIGHTSMITH_SHARED; SAMPLES, SEQ, EVAL_TOKENS, BITS_LIST override the defaults).
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
quant() {  # name method [args...]: skipped when done
  local name=$1; shift
  [ -d "$OUT/$name" ] || /usr/bin/time -f "%e s %M KB" -o "$OUT/$name.time" weightsmith compress \
    quantize "$MODEL" -o "$OUT/$name" --no-progress --report "$OUT/$name.report.json" "$@" \
    > "$OUT/$name.log" 2>&1
}
ppl() {  # name model domain file
  [ -s "$OUT/$1.$3.json" ] || weightsmith eval ppl "$2" --data "$4" --seq-len 512 \
    --max-tokens "$EVAL_TOKENS" --no-progress --json > "$OUT/$1.$3.json"
}
CAL=(--calib-samples "$SAMPLES" --seq-len "$SEQ")
for B in $BITS_LIST; do
  Q=(--bits "$B" --group-size 64)
  quant "rtn_w$B" --method rtn "${Q[@]}" &
  quant "gptq_wiki_w$B" --method gptq "${Q[@]}" --calib "$OUT/wiki_second.txt" "${CAL[@]}" &
  quant "gptq_mix_w$B" --method gptq "${Q[@]}" "${CAL[@]}" &
done
wait
for m in fp32 $(for B in $BITS_LIST; do echo rtn_w$B gptq_wiki_w$B gptq_mix_w$B; done); do
  path=$OUT/$m; [ "$m" = fp32 ] && path=$MODEL
  ppl "$m" "$path" tinystories "$DATA/tinystories_valid.txt" &
  ppl "$m" "$path" wiki_first "$OUT/wiki_first.txt" &
done
wait
for f in "$OUT"/*.json; do
  case $f in *report.json) continue;; esac
  echo "$(basename "$f" .json) $(python -c "import json,sys; print(json.load(open(sys.argv[1]))['ppl'])" "$f")"
done
for f in "$OUT"/*.time; do echo "$(basename "$f" .time) $(cat "$f")"; done
