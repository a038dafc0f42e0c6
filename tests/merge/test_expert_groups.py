"""Merge groups without mergekit (its parity is tests/merge/test_mergekit_moe_parity.py): a
per-expert Mixtral merged with a per-tensor-statistics method gives, fused as transformers fuses
it, exactly weightsmith's merge of the fused checkpoint (TIES, whole models and slices); an
element-wise method's jobs are not grouped; the byte splitter cuts at any boundary.
Exact comparisons (torch.equal): the same float32 operations on the same fused tensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from merge_testlib import run_cli, tensors
from test_mergekit_moe_parity import MOE, _fused_copy, fuse

from weightsmith.io.reader import open_checkpoint
from weightsmith.merge.engine import split_bytes
from weightsmith.merge.expert_groups import group_expert_jobs
from weightsmith.merge.methods import get_method
from weightsmith.merge.plan import build_plan
from weightsmith.merge.recipe import load_recipe
from weightsmith.testing import build_tiny_model
from weightsmith.testing.tiny import TINY_ARCHS


def test_split_bytes_cuts_a_stream_into_consecutive_pieces():
    stream = iter([memoryview(bytes(range(0, 5))), memoryview(bytes(range(5, 12)))])
    pieces = split_bytes(stream, [3, 6, 3])
    got = [b"".join(bytes(c) for c in p) for p in pieces]
    assert got == [bytes(range(0, 3)), bytes(range(3, 9)), bytes(range(9, 12))]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("groups")
    cls, kwargs, _, _ = MOE["mixtral"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TINY_ARCHS, "mixtral", (cls, kwargs))
        for seed, m in enumerate("abc"):
            build_tiny_model(root / "experts" / m, "mixtral", seed=seed)
    for m in "abc":
        _fused_copy(root / "experts" / m, root / "fused" / m)
    return root


def _ties(models: Path, slices: bool) -> dict:
    recipe = {"merge_method": "ties", "base_model": str(models / "a"), "dtype": "float32",
              "parameters": {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}],
                             "weight": 1.0}}  # fmt: skip
    if slices:  # layer 1 of every model, then layer 0: groups are made per output layer
        recipe["slices"] = [
            {"sources": [{"model": str(models / m), "layer_range": r} for m in "abc"]}
            for r in ([1, 2], [0, 1])
        ]
    else:
        recipe["models"] = [{"model": str(models / m)} for m in "bc"]
    return recipe


@pytest.mark.parametrize("slices", [False, True], ids=["models", "slices"])
def test_per_expert_ties_is_the_fused_ties(mixtral, tmp_path, slices):
    outs = {}
    for layout in ("experts", "fused"):
        cfg = tmp_path / f"{layout}.yml"
        cfg.write_text(yaml.safe_dump(_ties(mixtral / layout, slices)))
        r = run_cli("run", cfg, "-o", tmp_path / layout)
        assert r.exit_code == 0, r.output
        outs[layout] = tensors(tmp_path / layout)
    mine, fused = fuse("mixtral", outs["experts"]), outs["fused"]
    assert set(mine) == set(fused)
    for n in fused:
        assert torch.equal(mine[n], fused[n]), n


def test_only_per_tensor_statistics_methods_are_grouped(mixtral, tmp_path):
    models = mixtral / "experts"
    cfg = tmp_path / "r.yml"
    cfg.write_text(yaml.safe_dump(_ties(models, slices=False)))
    recipe = load_recipe(cfg)
    a, b, c = (models / m for m in "abc")
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb, open_checkpoint(c) as cc:
        ckpts = {str(a): ca, str(b): cb, str(c): cc}
        jobs = build_plan(recipe, ckpts).jobs
        grouped = group_expert_jobs(jobs, ckpts, get_method("ties"))
        assert group_expert_jobs(jobs, ckpts, get_method("linear")) == jobs
    groups = [j for j in grouped if j.members]
    # 2 layers x (gate_up, down); 4 experts: gate_up has w1, w3 of each, in fused order
    assert [j.out_name for j in groups] == [
        f"model.layers.{i}.mlp.experts.{k}" for i in (0, 1) for k in ("gate_up_proj", "down_proj")
    ]
    assert groups[0].shape == (4, 256, 64) and groups[1].shape == (4, 64, 128)
    assert [m.out_name.split("experts.")[1] for m in groups[0].members[:3]] == [
        "0.w1.weight",
        "0.w3.weight",
        "1.w1.weight",
    ]
    # the router is looked up as mlp.gate (filter "mlp"), the experts as the fused tensor
    router = next(j for j in grouped if j.out_name.endswith("block_sparse_moe.gate.weight"))
    assert router.params.models[0]["density"] == 0.3
    assert groups[0].params.models[1]["density"] == 0.3
    assert len(grouped) == len(jobs) - sum(len(g.members) - 1 for g in groups)
