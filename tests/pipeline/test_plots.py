"""Plots: pooled per-layer numbers against hand-computed values, valid PNGs with their numbers
beside them, `compare --plot`, recipe plots, and the one-line error without matplotlib."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from weightsmith.cli.main import cli
from weightsmith.compare import tensor_diff
from weightsmith.compress.prune import PruneConfig, prune_checkpoint
from weightsmith.pipeline.plots import (
    layer_stats,
    size_ppl_points,
    weight_change,
    write_recipe_plots,
)
from weightsmith.pipeline.recipe import load_recipe
from weightsmith.pipeline.runner import plan_recipe, run_recipe
from weightsmith.testing.tiny import TOKENIZER_CORPUS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, (path, len(data))  # axes, bars and labels, not an empty canvas


def _diff_dict(a: torch.Tensor, b: torch.Tensor, layer: int | None) -> dict:
    d = tensor_diff(a, b).__dict__ | {"layer": layer}
    return d


def test_layer_stats_pool_like_one_big_tensor() -> None:
    # layer 0 holds two weights; pooling must equal tensor_diff of both concatenated
    a1, b1 = torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 0.0]])  # ||d||²=16, ||a||²=25
    a2, b2 = torch.tensor([[1.0, 2.0], [2.0, 0.0]]), torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    norm = torch.ones(4)  # 1-D tensors (norms) are left out of the layer pool
    rows = [_diff_dict(a1, b1, 0), _diff_dict(a2, b2, 0), _diff_dict(norm, 2 * norm, 0),
            _diff_dict(a1, a1, 1), _diff_dict(a1, -a1, None)]  # fmt: skip
    stats = layer_stats(rows)
    assert [s["layer"] for s in stats] == [0, 1]
    whole = tensor_diff(torch.cat([a1.flatten(), a2.flatten()]), torch.cat([b1.flatten(), b2.flatten()]))  # fmt: skip
    assert stats[0]["rel_l2"] == pytest.approx(math.sqrt(17 / 34), abs=1e-12)  # hand: 16+1 / 25+9
    assert stats[0]["rel_l2"] == pytest.approx(whole.rel_l2, abs=1e-12)
    assert stats[0]["cosine"] == pytest.approx(whole.cosine, abs=1e-12)
    assert stats[0]["sparsity"] == pytest.approx(3 / 6) and stats[0]["tensors"] == 2
    assert stats[1] == {"layer": 1, "rel_l2": 0.0, "cosine": pytest.approx(1.0),
                        "sparsity": 0.0, "tensors": 1}  # fmt: skip


def test_size_ppl_points_label_with_step_ids(tmp_path: Path) -> None:
    steps = [
        {"id": "merged", "kind": "merge", "output": str(tmp_path / "merged"), "output_size": 900},
        {"id": "small", "kind": "quantize", "output": str(tmp_path / "small"), "output_size": 300},
        {"id": "q", "kind": "eval", "output": str(tmp_path / "small"), "output_size": 300,
         "reference_size": 900, "result": {"ppl": 7.2, "reference": str(tmp_path / "merged"),
                                           "reference_ppl": 6.6}},
        {"id": "q2", "kind": "eval", "output": str(tmp_path / "merged"), "output_size": 900,
         "result": {"ppl": 6.6}},  # the same model and number again: one point
        {"id": "acc", "kind": "eval", "output": str(tmp_path / "small"), "result": {"accuracy": 1}},
    ]  # fmt: skip
    points = size_ppl_points(steps)
    assert [(p["label"], p["role"], p["size"], p["ppl"]) for p in points] == [
        ("small", "model", 300, 7.2),
        ("merged", "reference", 900, 6.6),
    ]


@pytest.fixture
def pruned(tmp_path: Path, tiny_model) -> tuple[Path, Path]:
    src = tiny_model("llama", 0)
    out = tmp_path / "pruned"
    prune_checkpoint(src, out, PruneConfig(method="magnitude", sparsity=0.5), progress=False)
    return src, out


def test_prune_plot_numbers(tmp_path: Path, pruned: tuple[Path, Path]) -> None:
    src, out = pruned
    change = weight_change(src, out)
    assert [r["layer"] for r in change["layers"]] == [0, 1]
    for r in change["layers"]:
        assert r["sparsity"] == pytest.approx(0.5, abs=1e-3)  # every Linear pruned to 50%
        # magnitude pruning removes the smallest half: error well under the weights' norm
        assert 0.05 < r["rel_l2"] < 0.5 and 0.85 < r["cosine"] < 1.0
        assert r["tensors"] == 7  # q, k, v, o, gate, up, down
    report = {"steps": [
        {"id": "sparse", "kind": "prune", "output": str(out), "output_size": 1000,
         "weights": change},
        {"id": "ppl", "kind": "eval", "output": str(out), "output_size": 1000,
         "reference_size": 2000, "result": {"ppl": 12.5, "reference": str(src),
                                            "reference_ppl": 10.0}},
    ]}  # fmt: skip
    files = write_recipe_plots(report, tmp_path / "plots")
    names = sorted(Path(f).name for f in files)
    assert names == sorted(f"{s}.{e}" for s in ("sparse-layers", "size-vs-ppl")
                           for e in ("png", "json", "csv"))  # fmt: skip
    assert_png(tmp_path / "plots" / "sparse-layers.png")
    assert_png(tmp_path / "plots" / "size-vs-ppl.png")
    data = json.loads((tmp_path / "plots" / "sparse-layers.json").read_text())
    assert data["step"] == "sparse" and data["reference"] == str(src)
    assert [r["sparsity"] for r in data["rows"]] == pytest.approx([0.5, 0.5], abs=1e-3)
    csv_lines = (tmp_path / "plots" / "sparse-layers.csv").read_text().splitlines()
    assert csv_lines[0] == "layer,rel_l2,cosine,sparsity,tensors" and len(csv_lines) == 3
    ppl = json.loads((tmp_path / "plots" / "size-vs-ppl.json").read_text())
    assert [(r["label"], r["ppl"]) for r in ppl["rows"]] == [("sparse", 12.5), (src.name, 10.0)]


def test_what_each_step_is_measured_against(tmp_path: Path, tiny_model) -> None:
    """Per-layer error is vs the step's input; merges: vs ``base`` or the first model merged."""
    shutil.copytree(tiny_model("llama", 0), tmp_path / "a")
    shutil.copytree(tiny_model("llama", 1), tmp_path / "b")
    (tmp_path / "text.txt").write_text(" ".join(TOKENIZER_CORPUS))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [
        {"id": "m1", "merge": {"method": "linear", "args": ["b", "a"]}},
        {"id": "m2", "merge": {"method": "ties", "args": ["m1"], "base": "a", "density": 0.5}},
        {"id": "q", "quantize": {"method": "rtn", "bits": 8}},
        {"id": "st", "distill": {"teacher": "a", "data": "text.txt"}},  # input: q's output
        {"id": "ppl", "eval": {"data": "text.txt"}},
    ]}))  # fmt: skip
    work = tmp_path / "work"
    refs = {p.step.id: p.reference for p in plan_recipe(load_recipe(recipe), work)}
    assert refs == {"m1": tmp_path / "b", "m2": tmp_path / "a", "q": work / "m2",
                    "st": work / "q", "ppl": work / "st"}  # fmt: skip


def _edit(model: Path, name: str, fn) -> None:
    """Rewrite one tensor of a sharded checkpoint in place."""
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = fn(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})


def test_compare_plot(tmp_path: Path, tiny_model_copy) -> None:
    a = tiny_model_copy("llama", 0)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    q1, up0 = "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    _edit(b, q1, lambda t: 1.1 * t)  # rel L2 0.1, cosine 1
    _edit(b, up0, lambda t: -t)  # rel L2 2, cosine -1
    png = tmp_path / "out" / "cmp.png"
    result = CliRunner().invoke(cli, ["compare", str(a), str(b), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "tensors compared" in result.output and str(png) in result.output
    assert_png(png)
    rows = {r["name"]: r for r in json.loads(png.with_suffix(".json").read_text())["rows"]}
    assert rows[q1]["rel_l2"] == pytest.approx(0.1, rel=1e-5) and rows[q1]["layer"] == 1
    assert rows[q1]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows[up0]["rel_l2"] == pytest.approx(2.0, rel=1e-6) and rows[up0]["cosine"] == pytest.approx(-1.0)  # fmt: skip
    others = [r for n, r in rows.items() if n not in (q1, up0)]
    assert others and all(r["rel_l2"] == 0.0 and r["cosine"] == pytest.approx(1.0) for r in others)
    layers = [r["layer"] for r in json.loads(png.with_suffix(".json").read_text())["rows"]]
    in_layers = [x for x in layers if x is not None]
    assert in_layers == sorted(in_layers) and layers[-1] is None  # grouped by layer, rest last
    assert png.with_suffix(".csv").read_text().startswith("name,layer,rel_l2,cosine")


def test_without_matplotlib_one_clear_line(tmp_path: Path, monkeypatch, tiny_model) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` -> ImportError
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [{"convert": {}, "input": str(tiny_model())}]}))
    runner = CliRunner()
    work = tmp_path / "work"
    result = runner.invoke(cli, ["run", str(recipe), "-o", str(work), "--plots", str(tmp_path / "p")])  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: plots need matplotlib, which is not installed: pip install 'weightsmith[plots]'"
    ]
    assert not work.exists() and not (tmp_path / "p").exists()
    a = str(tiny_model())
    result = runner.invoke(cli, ["compare", a, a, "--plot", str(tmp_path / "c.png")])
    assert result.exit_code == 1 and "pip install 'weightsmith[plots]'" in result.output
    assert "tensors compared" not in result.output  # failed before any work


@pytest.mark.slow
def test_recipe_run_writes_plots(tmp_path: Path, tiny_model, monkeypatch) -> None:
    """End to end: prune -> quantize -> eval with --plots; resume reuses the numbers."""
    shutil.copytree(tiny_model("llama", 0), tmp_path / "models" / "a")
    (tmp_path / "models" / "text.txt").write_text(" ".join(TOKENIZER_CORPUS))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [
        {"id": "sparse", "prune": {"method": "magnitude", "sparsity": 0.5}, "input": "models/a"},
        {"id": "small", "quantize": {"method": "rtn", "bits": 8, "group_size": 32}},
        {"id": "quality", "eval": {"data": "models/text.txt", "seq_len": 32, "max_tokens": 200,
                                   "reference": "sparse"}},
    ]}))  # fmt: skip
    plots, work = tmp_path / "plots", tmp_path / "work"
    report = run_recipe(recipe, work, plots=plots, progress=False, echo=lambda m: None)
    assert report["ok"] and len(report["plots"]) == 9
    for name in ("sparse-layers", "small-layers", "size-vs-ppl"):
        assert_png(plots / f"{name}.png")
    sparse = json.loads((plots / "sparse-layers.json").read_text())
    assert sparse["reference"] == str(tmp_path / "models" / "a")
    assert [r["sparsity"] for r in sparse["rows"]] == pytest.approx([0.5, 0.5], abs=1e-3)
    small = json.loads((plots / "small-layers.json").read_text())
    assert small["dequantized"] == 14 and small["reference"] == str(work / "sparse")
    for r in small["rows"]:  # symmetric 8-bit keeps the zeros and rounds the rest finely
        assert r["sparsity"] >= 0.5 - 1e-3 and 0 < r["rel_l2"] < 0.02
    points = json.loads((plots / "size-vs-ppl.json").read_text())["rows"]
    assert [(p["label"], p["role"]) for p in points] == [("small", "model"), ("sparse", "reference")]  # fmt: skip
    assert points[0]["size"] < points[1]["size"]  # 8-bit is smaller than the fp32 input

    def no_reread(*args, **kwargs):
        raise AssertionError("resume must reuse the recorded numbers")

    monkeypatch.setattr("weightsmith.pipeline.plots.weight_change", no_reread)
    shutil.rmtree(plots)
    again = run_recipe(recipe, work, resume=True, plots=plots, progress=False, echo=lambda m: None)
    assert [s["skipped"] for s in again["steps"]] == [True, True, True]
    assert json.loads((plots / "sparse-layers.json").read_text()) == sparse
