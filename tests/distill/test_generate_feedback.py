"""dSFT data: `distill generate` (batched, resumable), `distill --method sft`, and AI feedback
(`distill feedback`: pairing rule, ties, judge loading)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from weightsmith.cli.main import distill_cli
from weightsmith.distill.feedback import load_judge, pick_pair
from weightsmith.distill.generate import GenerateConfig, generate_file
from weightsmith.errors import ConfigError

JUDGE = '''
def score(prompt, completion):
    """Deterministic: how many times the letter e appears (ties when equal)."""
    return float(completion.count("e"))


def flat(prompt, completion):
    return 1.0
'''


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Once upon a time {w}"} for w in ["Lily", "Tom", "the cat", "a dog", "Ben"]]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def _run(args):
    return CliRunner().invoke(distill_cli, [str(a) for a in args])


def test_generate_is_resumable_and_matches_uninterrupted(teacher, prompts_file, tmp_path):
    cfg = GenerateConfig(max_new_tokens=6, temperature=0.8, batch_size=2, seed=1)
    full = generate_file(teacher, prompts_file, tmp_path / "a.jsonl", cfg, progress=False)
    assert full["rows"] == 5 and full["generated"] == 5 and full["resumed"] == 0
    out = tmp_path / "b.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_file(teacher, prompts_file, out, cfg, progress=False, stop_after=1)
    assert not out.exists()  # only the partial file
    assert len((tmp_path / "b.jsonl.partial").read_text().splitlines()) == 2
    again = generate_file(teacher, prompts_file, out, cfg, progress=False)
    assert again["resumed"] == 2 and again["generated"] == 3
    assert out.read_text() == (tmp_path / "a.jsonl").read_text()  # same seeded samples
    assert not (tmp_path / "b.jsonl.partial").exists()


def test_generate_cli_then_sft(teacher, student, prompts_file, tmp_path):
    data, report = tmp_path / "d.jsonl", tmp_path / "r.json"
    r = _run(["generate", "--teacher", teacher, "--prompts", prompts_file, "-o", data,
              "--max-new-tokens", "8", "--no-progress", "--report", report])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    assert [x["index"] for x in rows] == list(range(5)) and all(x["completion"] for x in rows)
    r = _run(["generate", "--teacher", teacher, "--prompts", prompts_file, "-o", data])
    assert r.exit_code == 1 and "exists" in r.output
    out = tmp_path / "sft"
    r = _run(["--method", "sft", "--student", student, "--data", data, "-o", out,
              "--steps", "10", "--lr", "2e-2", "--batch-size", "5", "--seq-len", "32",
              "--eval-data", data, "--no-progress", "--report", tmp_path / "s.json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "s.json").read_text())["result"]
    assert res["eval_after"]["ce"] < res["eval_before"]["ce"] - 0.2  # learns the teacher's text
    assert json.loads((out / "weightsmith.json").read_text())["config"]["method"] == "sft"
    r = _run(["--method", "sft", "--teacher", teacher, "--student", student, "--data", data,
              "-o", tmp_path / "x", "--no-progress"])  # fmt: skip
    assert r.exit_code == 1 and "takes no --teacher" in r.output
    assert not (tmp_path / "x").exists()


def test_pick_pair_best_vs_random_lower_and_ties():
    rng = random.Random(0)
    seen = {pick_pair([1.0, 3.0, 2.0, 0.5], rng) for _ in range(50)}
    assert seen == {(1, 0), (1, 2), (1, 3)}  # chosen always the best, rejected any lower one
    assert pick_pair([2.0, 2.0], rng) is None
    assert pick_pair([2.0, 2.0, 1.0], rng) == (0, 2)  # tie at the top, a strictly lower exists


def test_load_judge(tmp_path):
    f = tmp_path / "judge.py"
    f.write_text(JUDGE)
    assert load_judge(f"{f}:score")("p", "eee") == 3.0
    assert load_judge("math:hypot")(3.0, 4.0) == 5.0  # module:function, two arguments
    for spec, match in [("nocolon", "expected module:function"),
                        ("math:fsum", r"must be a function score\(prompt, completion\)"),
                        ("json:loads", r"must be a function score\(prompt, completion\)"),
                        (f"{f}:missing", "no function 'missing'"),
                        ("not_a_module_xyz:f", "cannot import")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            load_judge(spec)


@pytest.mark.slow
def test_feedback_cli(teacher, student, prompts_file, tmp_path):
    judge = tmp_path / "judge.py"
    judge.write_text(JUDGE)
    out, report = tmp_path / "prefs.jsonl", tmp_path / "r.json"
    r = _run(["feedback", "--prompts", prompts_file, "--candidates", f"{teacher},{student}",
              "--judge", f"{judge}:score", "-o", out, "--k", "2", "--temperature", "1.0",
              "--max-new-tokens", "12", "--no-progress", "--report", report])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(report.read_text())["result"]
    assert res["pairs"] + res["ties_dropped"] == 5 and res["generated"] == 20
    answers = [json.loads(x) for x in Path(res["completions"]).read_text().splitlines()]
    assert len(answers) == 20
    prompts = [json.loads(x)["prompt"] for x in prompts_file.read_text().splitlines()]
    for pair in (json.loads(x) for x in out.read_text().splitlines()):
        scores = [a["score"] for a in answers if prompts[a["prompt_index"]] == pair["prompt"]]
        assert len(scores) == 4  # 2 candidates × k = 2
        assert pair["score_chosen"] == pair["chosen"].count("e") == max(scores)
        assert pair["score_rejected"] == pair["rejected"].count("e") < max(scores)
    # a judge that always ties: every prompt dropped, nothing written, one-line error
    r = _run(["feedback", "--prompts", prompts_file, "--candidates", student, "--judge",
              f"{judge}:flat", "-o", tmp_path / "none.jsonl", "--k", "2", "--temperature", "1",
              "--max-new-tokens", "4", "--no-progress"])  # fmt: skip
    assert r.exit_code == 1 and "tied" in r.output and not (tmp_path / "none.jsonl").exists()


def test_llm_judge_expected_rating(teacher):
    import torch

    from weightsmith.core.models import load_model, load_tokenizer
    from weightsmith.distill.feedback import RATING_TEMPLATE, LlmJudge

    judge = load_judge(f"llm:{teacher}")
    assert isinstance(judge, LlmJudge)
    score = judge("Q: who went to the park?", " Lily went.")
    assert 1.0 <= score <= 9.0 and judge("Q: who went to the park?", " Lily went.") == score
    tok = load_tokenizer(teacher)
    model = load_model(teacher, torch.device("cpu"))
    text = RATING_TEMPLATE.format(prompt="Q: who went to the park?", completion=" Lily went.")
    logits = model(input_ids=tok(text, return_tensors="pt")["input_ids"]).logits[0, -1]
    digits = [tok(str(d), add_special_tokens=False)["input_ids"][0] for d in range(1, 10)]
    p = torch.softmax(logits[digits], -1)
    assert score == pytest.approx(sum((d + 1) * float(p[d]) for d in range(9)), abs=1e-5)
