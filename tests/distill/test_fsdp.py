"""FSDP2 distillation on CPU (gloo): two processes each hold half the student and its AdamW
state, train to the weights one process trains, and the refusals come before any work.

Tolerance of "2 processes == 1 process" (float32 reduction order, nothing else differs): each
AdamW step moves a weight by lr·m̂/(√v̂+ε) ≤ lr, and a relative gradient perturbation ρ changes
that move by about lr·ρ, so after T steps |Δw| ≲ T·lr·ρ. Reordered float32 sums (each rank sums
its half of the batch, then the reduce-scatter adds the halves; the clip norm is summed per
shard) perturb a gradient by ~n·2⁻²⁴ of the sum of its terms' magnitudes; allowing cancellation
down to 1/300 of that, ρ = 3e-4, with T = 3 and lr = 1e-2: atol = 3·1e-2·3e-4 ≈ 1e-5 (measured
on a 2-layer student: 4.5e-7 full, 4.6e-8 LoRA). A weight whose gradient cancels more than that
moves further: on an AMD EPYC CI machine one of 20,480 elements differed by 1.18e-5, so up to
0.1 % of the weights may exceed ATOL, none 10·ATOL. The losses agree to rel 1e-5 (the first is
the same forward pass).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from weightsmith.cli.main import distill_cli
from weightsmith.core.training.fsdp import decoder_layers, fsdp_from_env, layer_names
from weightsmith.errors import ConfigError
from weightsmith.io import open_checkpoint
from weightsmith.io.architectures import registry

ATOL = 1e-5  # see the module docstring
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "accelerate_fsdp.yaml"
COMMON = ["--steps", "3", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2",
          "--lr", "1e-2", "--no-progress"]  # fmt: skip
# the fixture student (llama, hidden 64, intermediate 128, 4 heads of 16, 2 KV heads, vocab 320,
# untied, 1 layer): embeddings + lm_head + final norm, then per layer q,o 64·64, k,v 32·64,
# gate,up,down 128·64 and two norms
STUDENT_ELEMENTS = 2 * 320 * 64 + 64 + (2 * 4096 + 2 * 2048 + 3 * 8192 + 2 * 64)
# LoRA r=4 on the 7 Linears: r·(in+out) each
LORA_ELEMENTS = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)


def _env() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip


def _launch(args: list, launcher: str) -> None:
    if launcher == "accelerate":
        if shutil.which("accelerate") is None:
            pytest.skip("accelerate launcher not on PATH")
        head = ["accelerate", "launch", "--config_file", str(CONFIG)]
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd = [*head, "-m", "weightsmith.distill", *map(str, args)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _compare(tmp_path: Path, trainable: int) -> dict:
    one = json.loads((tmp_path / "one.json").read_text())["result"]
    two = json.loads((tmp_path / "two.json").read_text())["result"]
    assert one["world_size"] == 1 and one["fsdp"] is None
    assert two["world_size"] == 2 and two["fsdp"]["backend"] == "fsdp2"
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    ranks = two["fsdp"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert sum(r["param_elements"] for r in ranks) == STUDENT_ELEMENTS + (
        trainable if trainable != STUDENT_ELEMENTS else 0
    )
    assert sum(r["trainable_elements"] for r in ranks) == trainable
    for r in ranks:  # about half of everything on each process
        total = sum(x["param_elements"] for x in ranks)
        assert abs(r["param_elements"] - total / 2) <= 0.02 * total, ranks
        assert abs(r["trainable_elements"] - trainable / 2) <= 0.02 * trainable, ranks
        assert r["optimizer_elements"] == 2 * r["trainable_elements"]  # exp_avg, exp_avg_sq
        assert r["peak_rss"] > 0
    with open_checkpoint(tmp_path / "one") as a, open_checkpoint(tmp_path / "two") as b:
        assert set(a.tensors) == set(b.tensors)
        diffs = [(b.get_tensor(n) - a.get_tensor(n)).abs().flatten() for n in sorted(a.tensors)]
    diff = torch.cat(diffs)
    # at most 0.1 % of the weights beyond ATOL (gradients that nearly cancel), none beyond
    # 10·ATOL; all of them shows a real divergence, not summation order
    assert (diff > ATOL).sum() <= 1e-3 * diff.numel(), f"{(diff > ATOL).sum()} beyond {ATOL}"
    assert diff.max() <= 10 * ATOL, f"max |Δ| {diff.max():.3g}"
    return two["fsdp"]


@pytest.mark.slow
def test_fsdp_full_student_two_processes_match_one(teacher, student, corpus, tmp_path):
    """`accelerate launch --config_file examples/accelerate_fsdp.yaml` (FSDP2, gloo, 2
    processes; the launcher's ACCELERATE_USE_FSDP is --fsdp) == one process, online teacher
    sharded too."""
    args = ["--teacher", teacher, "--student", student, "--data", corpus, *COMMON]
    r = CliRunner().invoke(distill_cli, [str(a) for a in args] + ["-o", str(tmp_path / "one"),
                           "--report", str(tmp_path / "one.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    _launch([*args, "-o", tmp_path / "two", "--report", tmp_path / "two.json"], "accelerate")
    fsdp = _compare(tmp_path, STUDENT_ELEMENTS)
    assert fsdp["teacher_sharded"] and fsdp["student_layers"] == 1
    prov = json.loads((tmp_path / "two" / "weightsmith.json").read_text())
    assert prov["training"]["world_size"] == 2


@pytest.mark.slow
def test_fsdp_lora_student_two_processes_match_one(teacher, student, corpus, tmp_path):
    """`torchrun --nproc_per_node 2 ... --fsdp`, LoRA student: adapters and frozen base
    sharded, the merged W + ΔW equals one process's."""
    args = ["--teacher", teacher, "--student", student, "--data", corpus, "--lora-r", "4",
            "--lora-dropout", "0", *COMMON]  # fmt: skip
    r = CliRunner().invoke(distill_cli, [str(a) for a in args] + ["-o", str(tmp_path / "one"),
                           "--report", str(tmp_path / "one.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    _launch(["kd", *args, "--fsdp", "-o", tmp_path / "two", "--report", tmp_path / "two.json"],
            "torchrun")  # fmt: skip
    _compare(tmp_path, LORA_ELEMENTS)


def test_fsdp_one_process_reports_unsharded(teacher, student, corpus, tmp_path):
    """--fsdp in one process: nothing to shard, same weights, the counts of the whole model."""
    args = ["--teacher", teacher, "--student", student, "--data", corpus, "--steps", "1",
            "--seq-len", "32", "--batch-size", "4", "--no-progress"]  # fmt: skip
    for out, extra in (("plain", []), ("fsdp", ["--fsdp"])):
        r = CliRunner().invoke(distill_cli, [str(a) for a in [*args, *extra, "-o",
                               tmp_path / out, "--report", tmp_path / f"{out}.json"]])  # fmt: skip
        assert r.exit_code == 0, r.output
    rank = json.loads((tmp_path / "fsdp.json").read_text())["result"]["fsdp"]["ranks"][0]
    assert rank["param_elements"] == rank["trainable_elements"] == STUDENT_ELEMENTS
    assert rank["optimizer_elements"] == 2 * STUDENT_ELEMENTS
    with open_checkpoint(tmp_path / "plain") as a, open_checkpoint(tmp_path / "fsdp") as b:
        for name in a.tensors:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name


def _fails(args: list, match: str, out: Path) -> None:
    r = CliRunner().invoke(distill_cli, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], r.output
    assert not out.exists()


def test_fsdp_refuses_an_undescribed_architecture_before_training(
    teacher, student, corpus, tmp_path
):
    """A student whose config names an architecture with no description (a Mamba-2 here):
    its decoder layers are unknown, so FSDP cannot wrap it: one line, nothing written."""
    odd = tmp_path / "odd"
    shutil.copytree(student, odd)
    config = json.loads((odd / "config.json").read_text())
    config.update(model_type="mamba2", architectures=["Mamba2ForCausalLM"])
    (odd / "config.json").write_text(json.dumps(config))
    out = tmp_path / "o"
    _fails(["kd", "--teacher", teacher, "--student", odd, "--data", corpus, "-o", out, "--fsdp",
            *COMMON], "--fsdp cannot wrap the student", out)  # fmt: skip


@pytest.mark.parametrize(
    "extra, match",
    [
        (["dpo", "--data", "{prefs}"], "--fsdp is for distill kd|seqkd|sft, not dpo"),
        (["kd", "--eval-data", "{corpus}"], "--fsdp does not run with --eval-data"),
        (["kd", "--lmbda", "0.5"], "--fsdp does not run with --lmbda"),
        (["kd", "--lora-r", "4", "--optim", "adamw8bit"], "--fsdp does not run with --optim"),
    ],
)
def test_fsdp_refusals(teacher, student, corpus, prefs_jsonl, tmp_path, monkeypatch, extra,
                       match):  # fmt: skip
    out = tmp_path / "o"
    extra = [a.replace("{prefs}", str(prefs_jsonl)).replace("{corpus}", str(corpus))
             for a in extra]  # fmt: skip
    data = [] if "--data" in extra else ["--data", corpus]
    teach, flag = ["--teacher", teacher], ["--fsdp"]
    if extra[0] == "dpo":  # no --fsdp option there: an FSDP accelerate launch asks for it
        teach, flag = [], []
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    _fails([*extra, *teach, "--student", student, *data, "-o", out, *flag, *COMMON], match, out)


def test_fsdp_from_accelerate_env(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_from_env()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_from_env()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not fsdp_from_env()


def test_layer_names_from_the_description_not_class_names(student):
    """The layer templates of the description name the modules; a model without them (here
    a bare Linear) is refused in one line."""
    with open_checkpoint(student) as c:
        names = layer_names(c.arch, c.config, "s")
    assert names == [["model.layers.0"]]
    gpt2 = layer_names(registry()["gpt2"], {"n_layer": 2}, "g")
    assert gpt2 == [["transformer.h.0", "transformer.h.1"], ["h.0", "h.1"]]  # alternatives
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=10))
    found = decoder_layers(model, gpt2)
    assert len(found) == 2 and all(a is b for a, b in zip(found, model.transformer.h, strict=True))
    with pytest.raises(
        ConfigError, match=r"cannot wrap Linear: it has no module 'model\.layers\.0'"
    ):
        decoder_layers(torch.nn.Linear(2, 2), names)
    with pytest.raises(ConfigError, match="no 'num_hidden_layers'"):
        layer_names(registry()["llama"], {}, "s")
