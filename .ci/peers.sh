#!/usr/bin/env bash
# Peer tools for parity tests, each in its own virtualenv (torch==2.13.0 first, so no CUDA
# wheels), cached under .cache/peers/ (gitignored) and reused while the pinned versions match.
#   bash .ci/peers.sh            -> prints `export MERGEKIT_VENV=...` lines for the test run
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${WEIGHTSMITH_PEERS_DIR:-$PWD/.cache/peers}"
mkdir -p "$ROOT"
# One run at a time per cache: a second run (another checkout, a parallel job) waits here, then
# finds the peers ready instead of deleting a virtualenv that is being built.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$ROOT/.lock"
  flock 9
fi

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

# llama.cpp (issue #17 oracle; built last, it takes the longest): llama-cpp-python's bindings
# (llama_model_quantize) built from its sdist with a kept build folder, then the bundled
# llama.cpp's llama-quantize / llama-imatrix tools built incrementally in that same folder
# (same libllama, so `--imatrix FILE` can be tested).
llamacpp_peer() {
  local ver=0.3.36 dir="$ROOT/llamacpp"
  local stamp="llama-cpp-python==$ver gguf==0.19.0 cmake==3.31.6 scikit-build-core==0.11.6 native=off"
  if [ -f "$dir/.ready" ] && [ "$(cat "$dir/.ready")" = "$stamp" ]; then
    return 0
  fi
  echo "== peer llamacpp: building $stamp into $dir (10-20 min on 2 cores)" >&2
  rm -rf "$dir"
  python -m venv "$dir"
  "$dir/bin/pip" install -q torch==2.13.0 >&2
  "$dir/bin/pip" install -q cmake==3.31.6 scikit-build-core==0.11.6 gguf==0.19.0 numpy >&2
  "$dir/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$ver" -d "$dir/sdist" >&2
  tar -xzf "$dir/sdist/llama_cpp_python-$ver.tar.gz" -C "$dir/sdist"
  local src="$dir/sdist/llama_cpp_python-$ver"
  CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" \
    "$dir/bin/pip" install -q --no-build-isolation -C build-dir="$dir/build" "$src" >&2
  PATH="$dir/bin:$PATH" cmake -S "$src" -B "$dir/build" -DLLAMA_BUILD_TOOLS=ON >/dev/null
  PATH="$dir/bin:$PATH" cmake --build "$dir/build" -j 2 --target llama-quantize llama-imatrix >&2
  echo "$stamp" > "$dir/.ready"
}
llamacpp_peer
echo "export LLAMACPP_VENV=$ROOT/llamacpp"

