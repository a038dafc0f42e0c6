#!/usr/bin/env bash
# Peer tools for parity tests, each in its own virtualenv (torch==2.13.0 first, so no CUDA
# wheels), cached under .cache/peers/ (gitignored) and reused while the pinned versions match.
#   bash .ci/peers.sh            -> prints `export MERGEKIT_VENV=...` lines for the test run
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${WEIGHTSMITH_PEERS_DIR:-$PWD/.cache/peers}"
mkdir -p "$ROOT"

peer() {  # name, stamp (the pinned requirement), pip args...
  local name=$1 stamp=$2 dir="$ROOT/$1"
  shift 2
  if [ -f "$dir/.ready" ] && [ "$(cat "$dir/.ready")" = "$stamp" ]; then
    return 0
  fi
  echo "== peer $name: installing $stamp into $dir" >&2
  rm -rf "$dir"
  python -m venv "$dir"
  "$dir/bin/pip" install -q torch==2.13.0 >&2
  "$dir/bin/pip" install -q "$@" >&2
  echo "$stamp" > "$dir/.ready"
}

peer mergekit "mergekit==0.1.5" "mergekit==0.1.5"
echo "export MERGEKIT_VENV=$ROOT/mergekit"

# llm-compressor (FP8 / W8A8 / FP4 parity: model_free_ptq, QuantizationModifier, SmoothQuant)
peer llmcompressor "llmcompressor==0.14.0.1" "llmcompressor==0.14.0.1"
echo "export LLMCOMPRESSOR_VENV=$ROOT/llmcompressor"
