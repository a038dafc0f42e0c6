"""MoE merges equal mergekit 0.1.5's (run from its own venv, .cache/peers/mergekit) on tiny
seeded Mixtral and Qwen3-MoE models, the two MoE architectures mergekit 0.1.5 describes (it has
no DeepSeek-V3 description).

mergekit 0.1.5 reads and writes transformers 5's in-memory layout: fused 3-D experts
(``mlp.experts.gate_up_proj`` = [gate; up] per expert, ``mlp.experts.down_proj``) and the router
as ``mlp.gate``; a checkpoint saved with one Linear per expert is fused on read through
transformers' conversion mapping. So a merge of fused-layout inputs must give mergekit's tensors
exactly, and a merge of per-expert inputs (which weightsmith keeps per expert) must give them
after fusing: methods with per-tensor statistics (TIES' top-k, SLERP's angle, model_stock's
cosines, ...) merge each layer's per-expert Linears as the one fused tensor mergekit sees
(merge/expert_groups.py), and parameter filters match mergekit's names (``mlp`` selects
Mixtral's ``block_sparse_moe`` experts and router). Tolerance: 1e-6 absolute, float32; the
same bits with ``dtype: bfloat16`` (TIES, SLERP). DELLA (randomised) is compared with
weightsmith's own merge of the fused inputs: bit-identical for the same seed.

The recipes run through ``weightsmith merge run`` (the CLI); ``merge ties`` (a per-method
command) must write the same tensors as ``merge run`` with the equivalent YAML.

Slow: skipped when mergekit's venv is absent, a failure under WEIGHTSMITH_REQUIRE_PEERS=1.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from merge_testlib import run_cli, tensors
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from weightsmith.testing import build_tiny_model
from weightsmith.testing.peers import peer_python, require_peer
from weightsmith.testing.tiny import TINY_ARCHS

MERGEKIT_PY = peer_python("mergekit")
DRIVER = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    config = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
    run_merge(config, out, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
"""
_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
             pad_token_id=1, tie_word_embeddings=False)  # fmt: skip
# name -> (config class, settings, per-expert module template, (gate, up, down) Linear names)
MOE = {
    "mixtral": ("MixtralConfig", dict(_BASE, num_local_experts=4, num_experts_per_tok=2),
                "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2")),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_BASE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32),
                  "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
}  # fmt: skip
EXPERTS, LAYERS = 4, 2
RECIPES = {
    "linear": {"merge_method": "linear",
               "models": [{"model": "a", "parameters": {"weight": 0.3}},
                          {"model": "b", "parameters": {"weight": 0.7}}]},
    "ties": {"merge_method": "ties", "base_model": "a",
             "models": [{"model": "b", "parameters": {"weight": 0.7, "density": 0.4}},
                        {"model": "c", "parameters": {"weight": 0.5, "density": 0.6}}],
             "parameters": {"normalize": True}},
    # "mlp" matches mergekit's names: Mixtral's block_sparse_moe experts and router included
    "ties_filter": {"merge_method": "ties", "base_model": "a",
                    "models": [{"model": "b", "parameters": {"weight": 1.0}},
                               {"model": "c", "parameters": {"weight": 0.5}}],
                    "parameters": {"density": [{"filter": "mlp", "value": 0.3},
                                               {"value": 0.7}]}},
    "slerp": {"merge_method": "slerp", "base_model": "a",
              "models": [{"model": "a"}, {"model": "b"}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0.2, 0.8]},
                                   {"filter": "mlp", "value": 0.3}, {"value": 0.6}]}},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "a",
                         "models": [{"model": "b", "parameters": {"weight": 1.0, "density": 0.6,
                                                                  "gamma": 0.05}},
                                    {"model": "c", "parameters": {"weight": 0.5,
                                                                  "density": 0.4}}]},
    "sce": {"merge_method": "sce", "base_model": "a", "models": [{"model": "b"}, {"model": "c"}],
            "parameters": {"select_topk": 0.5}},
    "model_stock": {"merge_method": "model_stock", "base_model": "a",
                    "models": [{"model": "b"}, {"model": "c"}]},
    "nuslerp": {"merge_method": "nuslerp", "base_model": "a",
                "models": [{"model": "b", "parameters": {"weight": 1.0}},
                           {"model": "c", "parameters": {"weight": 2.0}}],
                "parameters": {"nuslerp_flatten": False}},
    "multislerp": {"merge_method": "multislerp",
                   "models": [{"model": m, "parameters": {"weight": w}}
                              for m, w in (("a", 0.2), ("b", 0.5), ("c", 0.3))]},
    "karcher": {"merge_method": "karcher", "models": [{"model": "b"}, {"model": "c"}]},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "a",
                     "models": [{"model": "b"}]},
}  # fmt: skip
RECIPES["slerp_slices"] = {  # slices: groups are made per output layer
    "merge_method": "slerp", "base_model": "a",
    "slices": [{"sources": [{"model": m, "layer_range": [0, 2]} for m in "ab"]}],
    "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.7]}, {"value": 0.5}]},
}  # fmt: skip
# mergekit's dtype semantics on the fused group: bfloat16 arithmetic, the same bits
RECIPES |= {f"{n}_bf16": {**RECIPES[n], "dtype": "bfloat16"} for n in ("ties", "slerp")}
SELF_RECIPES = {  # randomised: per-expert inputs against weightsmith's fused-input merge
    "della": {"merge_method": "della", "base_model": "a",
              "models": [{"model": "b", "parameters": {"weight": 1.0, "density": 0.4,
                                                       "epsilon": 0.2}}]},
}  # fmt: skip
LAYOUTS = ("experts", "fused")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _mergekit() -> None:
    require_peer("mergekit")


def _fused_copy(src: Path, out: Path) -> Path:
    """``src`` saved under transformers' in-memory names (fused 3-D experts, ``mlp.gate``)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((src / f).read_bytes())
    return out


def fuse(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert tensors in mergekit's fused layout: gate_up_proj[e] = [gate_e; up_e],
    down_proj[e] = down_e; Mixtral's block_sparse_moe.gate becomes mlp.gate."""
    _, _, template, (g, u, d) = MOE[name]
    out = {k: v for k, v in state.items() if ".experts." not in k}
    out = {k.replace("block_sparse_moe.gate.", "mlp.gate."): v for k, v in out.items()}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        ex = [p + template.format(e=e) for e in range(EXPERTS)]
        out[p + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([state[x + g + ".weight"], state[x + u + ".weight"]]) for x in ex]
        )
        out[p + "mlp.experts.down_proj"] = torch.stack([state[x + d + ".weight"] for x in ex])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str, str], tuple[Path, Path]]:
    """Every (architecture, input layout, recipe): mergekit's output and weightsmith's."""
    root = tmp_path_factory.mktemp("moe-parity")
    args, out = [], {}
    for name, (cls, kwargs, _, _) in MOE.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(TINY_ARCHS, name, (cls, kwargs))
            for seed, m in enumerate("abc"):
                build_tiny_model(root / name / "experts" / m, name, seed=seed)
        for m in "abc":
            _fused_copy(root / name / "experts" / m, root / name / "fused" / m)
        for layout in LAYOUTS:
            models = root / name / layout
            for recipe, data in {**RECIPES, **SELF_RECIPES}.items():
                cfg = root / f"{name}-{layout}-{recipe}.yml"
                cfg.write_text(yaml.safe_dump(_absolute({"dtype": "float32", **data}, models)))
                mk, ws = root / f"mk-{cfg.stem}", root / f"ws-{cfg.stem}"
                r = run_cli("run", cfg, "-o", ws)
                assert r.exit_code == 0, r.output
                out[name, layout, recipe] = (mk, ws)
                if recipe in RECIPES:
                    args += [str(cfg), str(mk)]
    proc = subprocess.run(
        [str(MERGEKIT_PY), "-c", DRIVER, *args], capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _absolute(data, models: Path):
    if isinstance(data, dict):
        return {k: (str(models / v) if k in ("model", "base_model") else _absolute(v, models))
                for k, v in data.items()}  # fmt: skip
    if isinstance(data, list):
        return [_absolute(v, models) for v in data]
    return data


CASES = [(name, layout, recipe) for name in sorted(MOE) for layout in LAYOUTS
         for recipe in sorted(RECIPES)]  # fmt: skip


@pytest.mark.parametrize(("name", "layout", "recipe"), CASES)
def test_moe_merge_equals_mergekit(runs, name, layout, recipe) -> None:
    mk, ws = runs[name, layout, recipe]
    theirs, mine = tensors(mk), tensors(ws)
    if layout == "experts":
        assert any(".experts.0." in n for n in mine)  # weightsmith keeps the input's layout
        mine = fuse(name, mine)
    assert set(mine) == set(theirs)
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in theirs)
    atol = 0 if recipe.endswith("_bf16") else 1e-6  # bfloat16: the same bits
    for n in theirs:
        assert mine[n].dtype == theirs[n].dtype, n
        torch.testing.assert_close(mine[n], theirs[n], rtol=0, atol=atol, msg=n)


@pytest.mark.parametrize("name", sorted(MOE))
@pytest.mark.parametrize("recipe", sorted(SELF_RECIPES))
def test_randomised_per_expert_merge_is_the_fused_merge(runs, name, recipe) -> None:
    """DELLA's per-row ranks and seeded draws run over the fused tensor: the per-expert merge,
    fused, is the fused-input merge to the bit (same seed, same tensor name and offsets). The
    other tensors draw from seeds of their stored names (Mixtral's router differs)."""
    fused = tensors(runs[name, "fused", recipe][1])
    mine = fuse(name, tensors(runs[name, "experts", recipe][1]))
    assert set(mine) == set(fused)
    experts = [n for n in fused if ".experts." in n]  # Mixtral's router is seeded by its name
    assert len(experts) == 2 * LAYERS
    for n in experts:
        assert torch.equal(mine[n], fused[n]), n
    base = fuse(name, tensors(runs[name, "experts", recipe][1].parent / name / "experts" / "a"))
    moved = (
        mine["model.layers.0.mlp.experts.gate_up_proj"]
        != base["model.layers.0.mlp.experts.gate_up_proj"]
    )
    assert 0.2 < float(moved.float().mean()) < 0.6  # density 0.4 of the task vector kept


@pytest.mark.parametrize("name", sorted(MOE))
def test_per_method_command_groups_experts_like_merge_run(runs, name, tmp_path) -> None:
    """``merge ties`` (CLI flags, not a YAML) writes what ``merge run`` writes for the same
    recipe: the per-method commands get the same expert grouping."""
    models = runs[name, "experts", "ties"][1].parent / name / "experts"
    out = tmp_path / "ties-cmd"
    r = run_cli("ties", models / "b", models / "c", "--base", models / "a", "--weights",
                "1.0,0.5", "--density", "mlp=0.3", "--density", "0.7", "--dtype", "float32",
                "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    expected = tensors(runs[name, "experts", "ties_filter"][1])
    got = tensors(out)
    assert set(got) == set(expected)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-6, msg=n)
