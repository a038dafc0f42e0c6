#!/usr/bin/env bash
# The README's demo as a new user runs it: a fresh virtualenv, no extras, no ../shared.
# The venv is made anew each run (pip's cache makes that quick); SmolLM2's safetensors
# conversion is cached in ~/.cache/weightsmith like on a user's machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$PWD/.cache/demo-venv"
rm -rf "$VENV" .cache/demo-out
python -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
WEIGHTSMITH_SHARED=none bash examples/quickstart.sh "" .cache/demo-out
python - <<'PY'
import json, math
for step in ("convert", "quantize", "eval", "prune", "merge"):
    r = json.load(open(f".cache/demo-out/{step}.json"))
    assert r.get("ok") is True, (step, r)
ppl = json.load(open(".cache/demo-out/eval.json"))
assert math.isfinite(ppl["result"]["ppl"]) and ppl["result"]["ppl"] < 100, ppl
print("demo ok:", {k: v for k, v in ppl["result"].items() if isinstance(v, (int, float))})
PY
deactivate
