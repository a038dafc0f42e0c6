"""A mixture of experts from dense models (mergekit-moe 0.1.5): Mixtral, or Qwen2-MoE with a
shared expert.

Same YAML keys as mergekit-moe: ``base_model`` (attention, norms, embeddings and the
tokenizer come from it), ``experts`` (each ``source_model`` gives one expert's MLP in every
layer; ``positive_prompts`` / ``negative_prompts``, ``noise_scale``, ``residual_scale``),
``gate_mode``, ``dtype``, ``experts_per_token`` (2), ``architecture`` and ``shared_experts``
(exactly one, gated: Qwen2-MoE output, :mod:`weightsmith.merge.moe_qwen`).

Router (gate) rows, one per expert and layer, as mergekit computes them:

* ``random``: ``randn(layers, experts, hidden)`` from a generator seeded with ``seed``
  (mergekit's ``--random-seed``: the same numbers); ``uniform_random``: U(-1/√h, 1/√h);
* ``cheap_embed``: the base model's token embeddings summed over the tokens of all (BOS +)
  prompts of an expert, normalised; minus the same for its negative prompts; normalised
  again; the same row in every layer;
* ``hidden`` (= ``hidden_last``): each decoder layer's input hidden state at the prompts' last
  token (:mod:`weightsmith.merge.moe_hidden`, one decoder layer in memory at a time).

``hidden_avg``, DeepSeek and Qwen3-MoE outputs are not implemented: refused with one line.
Mixtral tensors are streamed (:mod:`weightsmith.merge.moe_build`): each layer's experts are
read one tensor at a time into the fused ``experts.gate_up_proj`` / ``experts.down_proj``
(transformers 5's layout), so one output tensor is in memory at a time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.dtypes import parse_user_dtype

GATE_MODES = ("hidden", "hidden_last", "random", "uniform_random", "cheap_embed")
NOT_YET = ("hidden_avg",)
DENSE_TYPES = ("llama", "mistral")


@dataclass(frozen=True)
class Expert:
    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class MoeConfig:
    """mergekit-moe's YAML (``MoEMergeConfig``)."""

    base_model: str
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[Expert, ...] = ()
    architecture: str | None = None


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings")
    return tuple(value)


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _expert(data: Any, where: str) -> Expert:
    if not isinstance(data, dict) or not isinstance(data.get("source_model"), str):
        raise ConfigError(f"{where} needs a source_model (a model path)")
    unknown = set(data) - {
        "source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"
    }  # fmt: skip
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    return Expert(
        data["source_model"],
        _strings(data.get("positive_prompts"), f"{where}.positive_prompts"),
        _strings(data.get("negative_prompts"), f"{where}.negative_prompts"),
        _number(data.get("noise_scale"), f"{where}.noise_scale"),
        _number(data.get("residual_scale"), f"{where}.residual_scale"),
    )


def moe_config_from_dict(data: Any, allow_all_same: bool = False) -> MoeConfig:
    """A checked :class:`MoeConfig` from mergekit-moe YAML (one-line ConfigError if bad)."""
    if not isinstance(data, dict):
        raise ConfigError("an MoE config must be a mapping")
    keys = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token"}
    keys |= {"shared_experts", "architecture"}
    if set(data) - keys:
        raise ConfigError(f"unknown MoE config key {sorted(set(data) - keys)[0]!r}")
    if not isinstance(data.get("base_model"), str):
        raise ConfigError("base_model (a model path) is required")
    if not isinstance(data.get("experts"), list) or not data["experts"]:
        raise ConfigError("experts must be a non-empty list")
    ept = data.get("experts_per_token", 2)
    if isinstance(ept, bool) or not isinstance(ept, int):
        raise ConfigError(f"experts_per_token must be an integer, got {ept!r}")
    cfg = MoeConfig(
        data["base_model"],
        tuple(_expert(e, f"experts[{i}]") for i, e in enumerate(data["experts"])),
        str(data.get("gate_mode", "hidden")),
        data.get("dtype"),
        ept,
        tuple(_expert(e, f"shared_experts[{i}]") for i, e in enumerate(data.get("shared_experts") or [])),
        data.get("architecture"),
    )  # fmt: skip
    _check_config(cfg, allow_all_same)
    return cfg


def _check_config(cfg: MoeConfig, allow_all_same: bool = False) -> None:
    """mergekit's ``is_bad_config`` and what this implementation supports."""
    if cfg.gate_mode in NOT_YET:
        raise ConfigError(f"gate_mode {cfg.gate_mode!r} is not implemented yet (use {GATE_MODES})")
    if cfg.gate_mode not in GATE_MODES:
        raise ConfigError(f"gate_mode must be one of {GATE_MODES}, got {cfg.gate_mode!r}")
    _check_architecture(cfg)
    if cfg.experts_per_token < 1:
        raise ConfigError("experts_per_token must be >= 1")
    if len(cfg.experts) < cfg.experts_per_token:
        raise ConfigError("there must be at least as many experts as experts_per_token")
    if cfg.dtype is not None:
        parse_user_dtype(cfg.dtype)
    if cfg.gate_mode == "random":
        return
    for i, e in enumerate(cfg.experts):
        if not e.positive_prompts:
            raise ConfigError(f"experts[{i}] has no positive_prompts (gate_mode {cfg.gate_mode})")
    first = (cfg.experts[0].positive_prompts, cfg.experts[0].negative_prompts)
    if all((e.positive_prompts, e.negative_prompts) == first for e in cfg.experts[1:]):
        raise ConfigError("the prompts are identical for every expert: the router cannot choose")
    if not allow_all_same and all(
        e.source_model == cfg.experts[0].source_model for e in cfg.experts
    ):
        raise ConfigError(
            "every expert is the same model: pass --i-understand-this-is-not-useful-without-training"
        )


def _check_architecture(cfg: MoeConfig) -> None:
    """mergekit's output selection, for the outputs implemented here: Mixtral without shared
    experts, Qwen MoE with exactly one (gated: prompts, or random gates)."""
    arch = (cfg.architecture or "").lower()
    if not cfg.shared_experts:
        if not "mixtral".startswith(arch):
            raise ConfigError(
                f"architecture {cfg.architecture!r}: without shared_experts only Mixtral output is supported"
            )
        return
    if not "qwen moe".startswith(arch):
        raise ConfigError(
            f"architecture {cfg.architecture!r} with shared_experts: only Qwen MoE output is supported"
        )
    if len(cfg.shared_experts) != 1:
        raise ConfigError("Qwen MoE output needs exactly one shared expert")
    prompted = bool(cfg.shared_experts[0].positive_prompts)
    if not prompted and (cfg.gate_mode != "random" or not arch):
        raise ConfigError(
            "the shared expert needs positive_prompts (without them mergekit builds a DeepSeek "
            "MoE, not implemented here; with random gates set architecture: qwen)"
        )


def load_moe_config(path: str | os.PathLike[str], allow_all_same: bool = False) -> MoeConfig:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable MoE config ({str(e).splitlines()[0]})") from None
    return moe_config_from_dict(data, allow_all_same)


def _tokenize(tokenizer, prompts: tuple[str, ...]):
    return tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def cheap_embed_gates(embed: torch.Tensor, tokenizer, experts: tuple[Expert, ...], layers: int):
    """(layers, experts, hidden): mergekit's ``cheap_embed`` router rows."""

    def embedded(prompts: tuple[str, ...]) -> torch.Tensor:
        tok = _tokenize(tokenizer, prompts)
        h = embed.float()[tok["input_ids"]]  # = one_hot(ids) @ embed, exactly
        s = (h * tok["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        return s / s.norm(dim=-1, keepdim=True).clamp(min=1e-8)

    rows = []
    for e in experts:
        v = embedded(e.positive_prompts)
        if e.negative_prompts:
            v = v - embedded(e.negative_prompts)
        rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.cat(rows, dim=0)[None].expand(layers, -1, -1).contiguous()


def load_tokenizer(path: Path):
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
