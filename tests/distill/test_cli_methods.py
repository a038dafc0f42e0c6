"""`distill kd|seqkd|sft|dpo|step-by-step`: each subcommand shows and accepts only its own
options, trains end to end, and equals the bare command's old spelling bit for bit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from weightsmith.cli.main import distill_cli
from weightsmith.io import open_checkpoint

METHODS = ["kd", "seqkd", "sft", "dpo", "step-by-step"]
SHARED = {
    "--student", "--data", "--out", "--steps", "--epochs", "--lr", "--batch-size",
    "--seq-len", "--warmup-steps", "--weight-decay", "--max-grad-norm", "--seed", "--optim",
    "--lora-r", "--lora-alpha", "--lora-dropout", "--lora-targets", "--rslora", "--qlora",
    "--save-adapter", "--device", "--max-shard-size", "--force", "--progress", "--report", "--download",
    "--help",
}  # fmt: skip
OWN = {
    "kd": {"--teacher", "--teacher-cache", "--loss", "--beta", "--temperature", "--alpha",
           "--eval-data", "--grad-accum", "--lmbda", "--gen-temperature", "--max-new-tokens",
           "--gen-prompt-tokens", "--hidden-layers", "--hidden-weight", "--hidden-loss",
           "--fsdp", "--gold-matched-weight", "--gold-unmatched-weight", "--gold-map"},
    "seqkd": {"--teacher", "--gen-max-new-tokens", "--gen-temperature", "--eval-data",
              "--grad-accum", "--fsdp"},
    "sft": {"--eval-data", "--grad-accum", "--fsdp"},
    "dpo": {"--ref", "--ref-cache", "--loss", "--beta", "--label-smoothing", "--eval-fraction",
            "--grad-accum"},
    "step-by-step": {"--label-weight", "--eval-data"},  # no gradient accumulation there
}  # fmt: skip
FAST = ["--steps", "2", "--seq-len", "32", "--batch-size", "4", "--no-progress"]


def _run(args: list):
    return CliRunner().invoke(distill_cli, [str(a) for a in args])


def _listed_options(help_text: str) -> set[str]:
    """The long option names of the option lines of a --help page."""
    found = set()
    for line in help_text.splitlines():
        m = re.match(r"\s+(?:-\w, )?(--[\w-]+)", line)
        if m:
            found.add(m.group(1))
    return found


@pytest.mark.parametrize("method", METHODS)
def test_help_lists_only_own_options(method):
    r = _run([method, "--help"])
    assert r.exit_code == 0, r.output
    assert _listed_options(r.output) == SHARED | OWN[method]
    if method == "kd":
        assert "--loss [fkl|gkd|gold|jsd|rkl|uld]" in r.output
    if method == "dpo":
        assert "--loss [hinge|ipo|sigmoid]" in r.output


def test_shared_names_have_one_meaning_per_command():
    kd, dpo = distill_cli.commands["kd"], distill_cli.commands["dpo"]
    sbs = distill_cli.commands["step-by-step"]

    def help_of(cmd, name):
        return next(p for p in cmd.params if p.name == name).help

    assert "jsd" in help_of(kd, "beta") and "jsd" not in help_of(dpo, "beta")
    assert "reference" in help_of(dpo, "beta")
    assert "CE" in help_of(kd, "alpha") and "L_label" in help_of(sbs, "label_weight")
    bare = {p.name: p for p in distill_cli.params}
    assert bare["method"].hidden and bare["ref"].hidden and bare["gen_temperature"].hidden
    assert not bare["teacher"].hidden and not bare["alpha"].hidden


@pytest.mark.parametrize(
    "method, wrong",
    [
        ("sft", ["--beta", "0.1"]),
        ("sft", ["--teacher", "{student}"]),
        ("sft", ["--alpha", "0.5"]),
        ("dpo", ["--alpha", "0.5"]),
        ("dpo", ["--teacher", "{student}"]),
        ("dpo", ["--eval-data", "{data}"]),
        ("dpo", ["--temperature", "2"]),
        ("kd", ["--ref", "{student}"]),
        ("kd", ["--label-smoothing", "0.1"]),
        ("kd", ["--label-weight", "0.5"]),  # (--gen-temperature is kd's too: --lmbda)
        ("kd", ["--method", "sft"]),
        ("seqkd", ["--loss", "jsd"]),
        ("seqkd", ["--teacher-cache", "{student}"]),
        ("seqkd", ["--alpha", "0.5"]),
        ("step-by-step", ["--alpha", "0.5"]),
        ("step-by-step", ["--grad-accum", "2"]),
        ("step-by-step", ["--beta", "0.1"]),
    ],
)
def test_option_of_another_method_is_rejected(student, corpus, tmp_path, method, wrong):
    wrong = [w.format(student=student, data=corpus) for w in wrong]
    r = _run([method, "--student", student, "--data", corpus, "-o", tmp_path / "o", *FAST,
              *wrong])  # fmt: skip
    assert r.exit_code == 1, r.output
    assert f"No such option '{wrong[0]}'" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["kd", "--beta", "0.3"], "use it with --loss jsd"),  # --loss fkl: β would be unused
        (["kd", "--loss", "rkl", "--beta", "0.3"], "use it with --loss jsd"),
        (["dpo", "--loss", "ipo", "--label-smoothing", "0.1"], "use it with --loss sigmoid"),
        (["--steps", "3", "sft"], "--steps must come after the subcommand"),
        (["--method", "dpo", "sft"], "--method is the old spelling of the subcommand"),
    ],
)
def test_options_that_would_be_ignored_are_refused(student, corpus, tmp_path, args, match):
    r = _run([*args, "--student", student, "--data", corpus, "-o", tmp_path / "o", *FAST])
    assert r.exit_code == 1, r.output
    assert match in r.output
    assert not (tmp_path / "o").exists()


def _rationales(tmp_path: Path) -> Path:
    rows = [{"question": f"What is {a} plus {b}?", "answer": "7",
             "rationale": f"{a} plus {b} makes 7."} for a, b in [(1, 6), (2, 5), (3, 4)]]  # fmt: skip
    path = tmp_path / "rationales.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# method -> (subcommand options, the bare command's old spelling of the same run)
SPELLINGS = {
    "kd": (
        ["--teacher", "{teacher}", "--data", "{corpus}", "--loss", "jsd", "--beta", "0.3",
         "--alpha", "0.2", "--temperature", "1.5"],
        ["--teacher", "{teacher}", "--data", "{corpus}", "--loss", "jsd", "--beta", "0.3",
         "--alpha", "0.2", "--temperature", "1.5"],
    ),
    "kd-method": (
        ["--teacher", "{teacher}", "--data", "{corpus}", "--loss", "rkl"],
        ["--method", "kd", "--teacher", "{teacher}", "--data", "{corpus}", "--loss", "rkl"],
    ),
    "seqkd": (
        ["--teacher", "{teacher}", "--data", "{pairs}", "--gen-max-new-tokens", "6",
         "--gen-temperature", "0"],
        ["--method", "seqkd", "--teacher", "{teacher}", "--data", "{pairs}",
         "--gen-max-new-tokens", "6", "--gen-temperature", "0"],
    ),
    "sft": (["--data", "{pairs}"], ["--method", "sft", "--data", "{pairs}"]),
    "dpo": (
        ["--data", "{prefs}", "--loss", "ipo", "--beta", "0.2", "--eval-fraction", "0.25"],
        ["--method", "dpo", "--data", "{prefs}", "--loss", "ipo", "--beta", "0.2",
         "--eval-fraction", "0.25"],
    ),
    "step-by-step": (
        ["--data", "{sbs}", "--label-weight", "0.3"],
        ["--method", "step-by-step", "--data", "{sbs}", "--alpha", "0.3"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SPELLINGS))
def test_subcommand_trains_and_equals_the_bare_spelling(
    case, teacher, student, corpus, pairs_jsonl, prefs_jsonl, tmp_path
):
    paths = {"teacher": teacher, "corpus": corpus, "pairs": pairs_jsonl, "prefs": prefs_jsonl,
             "sbs": _rationales(tmp_path)}  # fmt: skip
    new, old = ([a.format(**paths) for a in args] for args in SPELLINGS[case])
    method = case.split("-method")[0]
    a = _run([method, "--student", student, "-o", tmp_path / "new", "--lr", "1e-2", *FAST, *new])
    b = _run(["--student", student, "-o", tmp_path / "old", "--lr", "1e-2", *FAST, *old])
    assert a.exit_code == 0, a.output
    assert b.exit_code == 0, b.output
    assert "distilled 2 steps" in a.stdout and "deprecated" not in a.stderr
    notes = [x for x in b.stderr.splitlines() if "deprecated" in x]
    if "--method" in old:
        assert notes == [f"note: `distill --method {method}` is deprecated; use `distill "
                         f"{method}`" + (" (--alpha is --label-weight there)"
                                         if method == "step-by-step" else "")]  # fmt: skip
    else:
        assert notes == []
    prov_a = json.loads((tmp_path / "new" / "weightsmith.json").read_text())
    prov_b = json.loads((tmp_path / "old" / "weightsmith.json").read_text())
    assert prov_a["config"] == prov_b["config"] and prov_a["config"]["method"] == method
    assert prov_a["training"]["steps"] == 2
    changed = False
    with (
        open_checkpoint(tmp_path / "new") as x,
        open_checkpoint(tmp_path / "old") as y,
        open_checkpoint(student) as s,
    ):
        assert set(x.tensors) == set(y.tensors) == set(s.tensors)
        for name in x.tensors:
            assert torch.equal(x.get_tensor(name), y.get_tensor(name)), name
            changed |= not torch.equal(x.get_tensor(name), s.get_tensor(name))
    assert changed  # it trained


def test_subcommand_values_reach_the_config(student, prefs_jsonl, tmp_path):
    """The per-method names land in the right config fields (β of DPO, not of JSD)."""
    sbs = _rationales(tmp_path)
    r = _run(["step-by-step", "--student", student, "--data", sbs, "-o", tmp_path / "s",
              "--label-weight", "0.25", *FAST])  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "s" / "weightsmith.json").read_text())["config"]
    assert cfg["sbs_alpha"] == 0.25 and cfg["dpo"] is None
    r = _run(["dpo", "--student", student, "--data", prefs_jsonl, "-o", tmp_path / "d",
              "--beta", "0.3", "--loss", "hinge", *FAST])  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "d" / "weightsmith.json").read_text())["config"]
    assert cfg["dpo"]["beta"] == 0.3 and cfg["dpo"]["loss"] == "hinge"
    assert cfg["loss"]["beta"] == 0.5  # the JSD mixture is untouched by DPO's β


def test_missing_required_options_exit_1(tmp_path):
    r = _run(["sft", "--data", tmp_path / "d.jsonl", "-o", tmp_path / "o"])
    assert r.exit_code == 1 and "Missing option '--student'" in r.output
    r = _run(["seqkd", "--student", tmp_path, "--data", tmp_path / "d.jsonl", "-o", tmp_path / "o"])
    assert r.exit_code == 1 and "Missing option '--teacher'" in r.output
    r = _run(["dpo"])  # no arguments: the subcommand's help
    assert r.exit_code in (0, 2) and "--ref-cache" in r.output


def test_every_registered_method_has_its_subcommand_and_is_a_method_choice() -> None:
    from weightsmith.cli.groups import distill_cli
    from weightsmith.distill import DISTILL_METHODS

    assert set(DISTILL_METHODS) <= set(distill_cli.commands)
    method = next(p for p in distill_cli.params if p.name == "method")
    assert set(method.type.choices) == set(DISTILL_METHODS)
