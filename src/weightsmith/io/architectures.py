"""Architectures described as data (``architectures/*.json``), not as if/else on model names.

Each description names how decoder-layer tensors are prefixed (``model.layers.{layer}.``),
which tensors sit before and after the layers, the lm_head, how Linear weights are laid out,
the order in which a layer's Linears run (used by calibration-based methods), and which tensor
dimension each config.json size must equal (checked when a checkpoint is opened).
Adding an architecture is adding one JSON file.

A multimodal description (Qwen2.5-VL, Gemma 3, LLaVA) names its text decoder: ``text_config``
is the config.json key holding the decoder's sizes (``text_config.num_hidden_layers``...), the
templates and names above are the decoder's, and every other tensor (vision tower, projector)
is outside it: copied bit-exactly by quantize and prune (:meth:`Architecture.in_text_decoder`).
``module_renames`` maps checkpoint name prefixes to the module paths of transformers' class
(the hub layout ``language_model.model.layers.0`` is ``model.language_model.layers.0``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources

from weightsmith.errors import CheckpointError

GENERIC = "unknown"  # the name of the description made up for a checkpoint without a config

# Used when no description matches: any ``<prefix>.<layers|h|layer|blocks>.<N>.`` name.
_GENERIC_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|layer|blocks))\.(\d+)\.")


@dataclass(frozen=True)
class ExpertLayout:
    """How a mixture-of-experts decoder layer names its experts (``experts`` in the JSON).

    Names are relative to the layer prefix. ``expert`` is the per-expert module template
    (``block_sparse_moe.experts.{expert}.``), ``sequential_linears`` an expert's Linears in
    execution order; ``fused`` maps a fused 3-D tensor (experts, out, in) to the per-expert
    Linears stacked along its dim 1; ``router`` is never quantized or pruned; ``module`` is
    the block's attribute in transformers' model (Mixtral stores ``block_sparse_moe``, its
    class calls it ``mlp``)."""

    count_keys: tuple[str, ...]
    top_k_key: str
    block: str
    module: str
    router: str
    expert: str
    sequential_linears: tuple[tuple[str, ...], ...]
    fused: tuple[tuple[str, tuple[str, ...]], ...]
    shared: tuple[str, ...] = ()
    # grouped routing (DeepSeek-V3): config keys of the group count and of the groups kept
    groups_key: str | None = None
    group_top_k_key: str | None = None
    # which layers are dense: the first N (DeepSeek ``first_k_dense_replace``) or a list of
    # layer indices (Qwen3-MoE ``mlp_only_layers``); renumbered when layers are dropped
    dense_prefix_key: str | None = None
    dense_layers_key: str | None = None

    # how released checkpoints store the experts: "per_expert" Linears (transformers fuses them
    # on load) or "fused" 3-D tensors (gpt-oss); the fused tensors' dims: "out_in" (experts,
    # out, in) or "in_out" (experts, in, out); a fused tensor's (experts, out) bias is named
    # tensor + fused_bias_suffix; ``interleaved`` fused tensors alternate gate/up columns
    storage: str = "per_expert"
    fused_layout: str = "out_in"
    fused_bias_suffix: str = ""
    interleaved: tuple[str, ...] = ()
    # the format transformers loads quantized fused experts from ("mxfp4": gpt-oss's own)
    quantized_format: str = ""
    # keys of ``fused`` that mergekit 0.1.5 merges (it reads per-expert checkpoints through
    # transformers' conversion mapping): each one's per-expert Linears form ONE merge group,
    # so methods with per-tensor statistics see them fused (experts along dim 0, the listed
    # Linears concatenated along dim 1), and parameters are looked up under these names
    merge_groups: tuple[str, ...] = ()

    def num_experts(self, config: dict | None) -> int | None:
        """The expert count config.json declares, or None."""
        for key in self.count_keys:
            if isinstance((config or {}).get(key), int):
                return int(config[key])
        return None

    def expert_of(self, rel: str) -> tuple[int, str] | None:
        """``(expert, linear)`` for a layer-relative per-expert weight name, else None."""
        head, _, tail = self.expert.partition("{expert}")
        if not rel.startswith(head) or not rel.endswith(".weight"):
            return None
        index, dot, linear = rel[len(head) :].partition(".")
        if not index.isdigit() or not dot or tail != ".":
            return None
        linear = linear[: -len(".weight")]
        named = {n for g in self.sequential_linears for n in g}
        return (int(index), linear) if linear in named else None

    def merge_group(self, rel: str) -> tuple[str, int, int] | None:
        """``(fused name, expert, position among the fused Linears)`` for a layer-relative
        per-expert weight that belongs to one of :attr:`merge_groups`, else None."""
        hit = self.expert_of(rel) if self.storage == "per_expert" else None
        if hit is None:
            return None
        fused = dict(self.fused)
        for group in self.merge_groups:
            if hit[1] in fused[group]:
                return group, hit[0], fused[group].index(hit[1])
        return None

    def merge_name(self, rel: str) -> str:
        """The layer-relative name mergekit 0.1.5 gives tensor ``rel`` (what parameter filters
        match): its merge group's fused name, or ``block`` renamed to ``module`` (Mixtral's
        ``block_sparse_moe.gate.weight`` is ``mlp.gate.weight`` in transformers' model)."""
        if not self.merge_groups:
            return rel
        group = self.merge_group(rel)
        if group is not None:
            return group[0]
        if self.storage == "per_expert" and rel.startswith(self.block + "."):
            return self.module + rel[len(self.block) :]
        return rel

    def expert_module(self, index: int) -> str:
        """The layer-relative module name of expert ``index`` (no trailing dot)."""
        return self.expert.replace("{expert}", str(index)).rstrip(".")


@dataclass(frozen=True)
class Architecture:
    """How one family of models names its tensors."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    num_layers_key: str
    layer_templates: tuple[str, ...]
    embed: tuple[str, ...]
    final: tuple[str, ...]
    lm_head: str | None
    linear_layout: str  # "out_in" (nn.Linear) or "in_out" (GPT-2 Conv1D)
    sequential_linears: tuple[tuple[str, ...], ...]
    # (config expression, tensor name or ``{layer}`` template, dim): see io/consistency.py
    config_shapes: tuple[tuple[str, str, int], ...] = ()
    description: str = ""
    known: bool = True
    experts: ExpertLayout | None = None
    text_config: str | None = None  # multimodal: the config.json key of the text decoder's sizes
    module_renames: tuple[tuple[str, str], ...] = ()  # checkpoint prefix -> module prefix
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    def layer_of(self, tensor_name: str) -> int | None:
        """The decoder-layer index a tensor belongs to, or None for embeddings/norm/head."""
        for pattern in self._patterns:
            m = pattern.match(tensor_name)
            if m:
                return int(m.group("layer"))
        return None

    def layer_prefix(self, tensor_name: str) -> str | None:
        """The ``model.layers.N.`` part of a layer tensor's name."""
        for pattern in self._patterns:
            m = pattern.match(tensor_name)
            if m:
                return m.group(0)
        return None

    def merge_name(self, tensor_name: str) -> str:
        """The name mergekit 0.1.5 gives a tensor (:meth:`ExpertLayout.merge_name`): what
        merge parameter filters match."""
        prefix = self.layer_prefix(tensor_name)
        if self.experts is None or prefix is None:
            return tensor_name
        return prefix + self.experts.merge_name(tensor_name[len(prefix) :])

    @property
    def multimodal(self) -> bool:
        """True when the model is a text decoder plus other towers (``text_config`` set)."""
        return self.text_config is not None

    def in_text_decoder(self, tensor_name: str) -> bool:
        """Whether a tensor belongs to the (text) decoder: its layers, embeddings, final norm and
        lm_head. Always true for a text-only model; false for a vision tower's tensors."""
        if not self.multimodal:
            return True
        heads = {self.lm_head}  # stored as named, or as transformers' class names it
        for old, new in self.module_renames:
            if self.lm_head and self.lm_head.startswith(old):
                heads.add(new + self.lm_head[len(old) :])
        return (
            self.layer_of(tensor_name) is not None
            or tensor_name in self.embed
            or tensor_name in self.final
            or tensor_name in heads
        )

    def sizes(self, config: dict | None) -> dict:
        """The part of config.json holding the decoder's sizes: ``config[text_config]`` for a
        multimodal model, else the config itself (older Qwen2.5-VL configs keep the text
        sizes at the top level)."""
        config = config or {}
        nested = config.get(self.text_config) if self.text_config else None
        return nested if isinstance(nested, dict) else config

    def rename_layer(self, tensor_name: str, new_index: int) -> str:
        """The same tensor name with its layer index replaced (for slicing/renumbering)."""
        for pattern in self._patterns:
            m = pattern.match(tensor_name)
            if m:
                start, end = m.span("layer")
                return tensor_name[:start] + str(new_index) + tensor_name[end:]
        raise ValueError(f"{tensor_name!r} is not a decoder-layer tensor")


def _compile(template: str) -> re.Pattern[str]:
    head, _, tail = template.partition("{layer}")
    return re.compile(re.escape(head) + r"(?P<layer>\d+)" + re.escape(tail))


def _from_dict(d: dict, known: bool = True) -> Architecture:
    templates = tuple(d["layer_templates"])
    return Architecture(
        name=d["name"],
        description=d.get("description", ""),
        model_types=tuple(d.get("model_types", ())),
        architectures=tuple(d.get("architectures", ())),
        num_layers_key=d.get("num_layers_key", "num_hidden_layers"),
        layer_templates=templates,
        embed=tuple(d.get("embed", ())),
        final=tuple(d.get("final", ())),
        lm_head=d.get("lm_head"),
        linear_layout=d.get("linear_layout", "out_in"),
        sequential_linears=tuple(tuple(g) for g in d.get("sequential_linears", ())),
        config_shapes=tuple(
            (r["config"], r["tensor"], int(r["dim"])) for r in d.get("config_shapes", ())
        ),
        known=known,
        experts=_experts(d.get("experts")),
        text_config=d.get("text_config"),
        module_renames=tuple((k, v) for k, v in d.get("module_renames", {}).items()),
        _patterns=tuple(_compile(t) for t in templates),
    )


def _experts(d: dict | None) -> ExpertLayout | None:
    if not d:
        return None
    return ExpertLayout(
        count_keys=tuple(d["count_keys"]),
        top_k_key=d.get("top_k_key", "num_experts_per_tok"),
        block=d["block"],
        module=d.get("module", d["block"]),
        router=d["router"],
        expert=d["expert"],
        sequential_linears=tuple(tuple(g) for g in d["sequential_linears"]),
        fused=tuple((k, tuple(v)) for k, v in d.get("fused", {}).items()),
        shared=tuple(d.get("shared", ())),
        groups_key=d.get("groups_key"),
        group_top_k_key=d.get("group_top_k_key"),
        dense_prefix_key=d.get("dense_prefix_key"),
        dense_layers_key=d.get("dense_layers_key"),
        storage=d.get("storage", "per_expert"),
        fused_layout=d.get("fused_layout", "out_in"),
        fused_bias_suffix=d.get("fused_bias_suffix", ""),
        interleaved=tuple(d.get("interleaved", ())),
        quantized_format=d.get("quantized_format", ""),
        merge_groups=tuple(d.get("merge_groups", ())),
    )


@cache
def registry() -> dict[str, Architecture]:
    """All shipped architecture descriptions, keyed by name."""
    out: dict[str, Architecture] = {}
    folder = resources.files("weightsmith.io") / "architectures"
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".json"):
            arch = _from_dict(json.loads(item.read_text(encoding="utf-8")))
            out[arch.name] = arch
    return out


def detect_architecture(config: dict | None, tensor_names: list[str]) -> Architecture:
    """Pick the description for a checkpoint: by config ``model_type``, then ``architectures``.
    A config that names a model type or class no description covers (Mixtral, a multimodal
    model) gets a generic, ``known=False`` one: its tensors are read and copied, but nothing
    that needs its layout runs (:func:`require_described`). Only without such a config are the
    tensor names matched against the layer templates."""
    archs = list(registry().values())
    if config:
        model_type = config.get("model_type")
        for arch in archs:
            if model_type in arch.model_types:
                return as_stored(arch, tensor_names)
        classes = [c for c in config.get("architectures") or [] if isinstance(c, str)]
        for name in classes:
            for arch in archs:
                if name in arch.architectures:
                    return as_stored(arch, tensor_names)
        if model_type or classes:
            label = " ".join([str(model_type or "")] + [f"({c})" for c in classes[:1]]).strip()
            return _generic(tensor_names, name=label)
    best, best_hits = None, 0
    for arch in sorted(archs, key=lambda a: a.experts is not None):  # ties: a dense family
        hits = sum(arch.layer_of(n) is not None for n in tensor_names)
        if hits > best_hits:
            best, best_hits = arch, hits
    if best is not None:
        return best
    return _generic(tensor_names)


def as_stored(arch: Architecture, tensor_names: list[str]) -> Architecture:
    """``arch`` with ``storage: "fused"`` when the checkpoint holds the fused 3-D expert tensors
    of a family released per expert (a Mixtral/Qwen3-MoE saved from transformers' in-memory
    model: ``save_pretrained`` of a model loaded from fused tensors writes them fused again),
    its router then named under the in-memory block (Mixtral's ``mlp.gate``)."""
    layout = arch.experts
    if layout is None or layout.storage == "fused":
        return arch
    keys = {k for k, _ in layout.fused}
    for n in tensor_names:
        prefix = arch.layer_prefix(n)
        if prefix is not None and n[len(prefix) :] in keys:
            block = n[len(prefix) :].split(".")[0]
            router = block + layout.router[len(layout.block) :]
            fused = replace(layout, storage="fused", block=block, module=block, router=router)
            return replace(arch, experts=fused)
    return arch


def require_described(arch: Architecture, what: str) -> None:
    """Refuse ``what`` (a command that calibrates, quantizes, prunes or merges) on a checkpoint
    whose config.json names an architecture no description covers, rather than guess its
    layout from tensor names. A checkpoint without such a config (bare safetensors) claims no
    class: its tensors are processed by name, as before."""
    if not arch.known and arch.name != GENERIC:
        raise CheckpointError(
            f"{what}: architecture {arch.name} is not described in weightsmith, so its layers "
            "and Linears are unknown; describe it in one JSON file in "
            "src/weightsmith/io/architectures/ (docs/architecture.md, 'An architecture')"
        )


def _generic(tensor_names: list[str], name: str = GENERIC) -> Architecture:
    prefixes = {m.group(1) for n in tensor_names if (m := _GENERIC_LAYER.match(n))}
    templates = [p + ".{layer}." for p in sorted(prefixes)]
    return _from_dict(
        {
            "name": name,
            "description": "no shipped description matched; layers found by name pattern",
            "layer_templates": templates,
            "lm_head": None,
        },
        known=False,
    )
