"""Step-by-step distillation: answer parsing on tricky strings, resumable rationale generation
that drops disagreeing rationales, the multi-task loss, training, and `eval accuracy`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import weightsmith.cli.accuracy_cmds  # noqa: F401  (registers `eval accuracy`)
from weightsmith.cli.groups import eval_cli
from weightsmith.cli.main import distill_cli
from weightsmith.core.answers import answers_agree, normalize_answer, parse_answer, prediction_of
from weightsmith.distill import generate as gen
from weightsmith.distill.generate import GenerateConfig
from weightsmith.distill.methods.step_by_step import multitask_loss
from weightsmith.distill.rationales import RationaleConfig, cut_at_next_example, generate_rationales


@pytest.mark.parametrize(
    "text, rationale, answer",
    [
        ("3 + 4 = 7. So the answer is 7.", "3 + 4 = 7.", "7"),
        ("It costs $1,250.50. The answer is $1,250.50.", "It costs $1,250.50.", "1250.5"),
        ("The answer is 3.5 apples. Then more text", "", "3.5"),
        ("Add them. Answer: **42**", "Add them.", "42"),
        ("5 * 3 = 15, minus 2 is 13 #### 13", "5 * 3 = 15, minus 2 is 13", "13"),
        ("We get \\boxed{12}", "We get", "12"),
        ("It is in France. The answer is: Paris.", "It is in France.", "paris"),
        ("First I said 5. Wait, the answer is 6.", "First I said 5. Wait,", "6"),  # last marker
        ("Thus, the final answer is 1,000,000!", "", "1000000"),
        ("Zero. The answer is -0.0", "Zero.", "0"),
        ("Half of 5. The answer is 2.5.\nQuestion: next", "Half of 5.", "2.5"),
        ("The Answer Is (B).", "", "b"),
    ],
)
def test_parse_answer_tricky(text, rationale, answer):
    assert parse_answer(text) == (rationale, answer)


@pytest.mark.parametrize("text", ["no answer here", "The answer is", "answer:   ", ""])
def test_parse_answer_none(text):
    assert parse_answer(text) is None


def test_normalize_and_agree():
    assert normalize_answer(" $1,000.00. ") == "1000"
    assert normalize_answer("50%") == "50"
    assert answers_agree("7.0", "7") and answers_agree("1,000", "1000")
    assert answers_agree("Paris.", "paris") and not answers_agree("7", "8")
    assert not answers_agree("1,000", "1.000")  # thousands separator vs decimal point
    assert prediction_of(" 42\nexplain: ...") == "42"
    assert (
        cut_at_next_example(
            "x. The answer is 3.\nQuestion: y? The answer is 9.", "Question: {question}\nAnswer:"
        )
        == "x. The answer is 3.\n"
    )


class _FakeModel:
    pass


def _fake_generate(outputs: dict[str, str], calls: list[int]):
    def generate(model, tok, prompts, cfg, seed):
        calls.append(len(prompts))
        return [outputs[p.split("Question: ")[-1].split("\n")[0]] for p in prompts]

    return generate


def test_rationales_resume_and_drop(tmp_path, monkeypatch, student):
    data = tmp_path / "tasks.jsonl"
    rows = [
        {"question": "2+2?", "answer": "4"},  # agrees
        {"question": "3+3?", "answer": "6"},  # disagrees -> dropped
        {"question": "4+4?", "answer": "8"},  # no answer -> dropped (unparsed)
        {"question": "5+5?"},  # no gold: kept with the teacher's answer
        {"question": "6+6?", "answer": "12"},  # "12.0" agrees
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    outputs = {"2+2?": " 2 and 2 make 4. The answer is 4.", "3+3?": " 3 and 3. The answer is 7.",
               "4+4?": " I do not know.", "5+5?": " 5 and 5 make 10. The answer is 10.",
               "6+6?": " 6 doubled. The answer is 12.0.\nQuestion: 1+1? The answer is 3."}  # fmt: skip
    calls: list[int] = []
    monkeypatch.setattr(gen, "generate_texts", _fake_generate(outputs, calls))
    monkeypatch.setattr(gen, "load_model", lambda *a, **k: _FakeModel())
    cfg = RationaleConfig(generation=GenerateConfig(batch_size=2))
    out = tmp_path / "r.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_rationales(student, data, out, cfg, progress=False, stop_after=2)
    assert not out.exists() and calls == [2, 2]
    info = generate_rationales(student, data, out, cfg, progress=False)
    assert calls == [2, 2, 1]  # only the fifth question was generated again
    assert info["resumed"] == 4 and info["kept"] == 3
    assert info["dropped_disagreeing"] == 1 and info["dropped_unparsed"] == 1
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert [k["question"] for k in kept] == ["2+2?", "5+5?", "6+6?"]
    assert kept[0]["rationale"] == "2 and 2 make 4." and kept[0]["answer"] == "4"
    assert kept[1]["answer"] == "10" and kept[2]["answer"] == "12"  # gold kept when given


def test_rationales_cli_real_teacher(teacher, tmp_path):
    data = tmp_path / "tasks.jsonl"
    data.write_text(json.dumps({"question": "Who went to the park?", "answer": "Lily"}) + "\n")
    r = CliRunner().invoke(distill_cli, [str(a) for a in [
        "rationales", "--teacher", teacher, "--data", data, "-o", tmp_path / "r.jsonl",
        "--max-new-tokens", "8", "--no-progress", "--report", tmp_path / "rep.json"]])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "rep.json").read_text())["result"]
    assert res["questions"] == 1
    assert res["kept"] + res["dropped_disagreeing"] + res["dropped_unparsed"] == 1
    r = CliRunner().invoke(distill_cli, [str(a) for a in [
        "rationales", "--teacher", teacher, "--data", data, "-o", tmp_path / "x.jsonl",
        "--few-shot", "1", "--no-progress"]])  # fmt: skip
    assert r.exit_code == 1 and "has only 0 rows" in r.output


def test_multitask_loss_hand_computed():
    torch.manual_seed(0)
    la, ra = torch.randn(2, 3, 5), torch.randn(2, 4, 5)
    ll = torch.tensor([[1, -100, 2], [-100, 3, -100]])
    rl = torch.tensor([[0, 1, 2, 3], [4, -100, -100, -100]])
    ce_l = sum(-F.log_softmax(la[b, t], -1)[ll[b, t]] for b, t in [(0, 0), (0, 2), (1, 1)]) / 3
    ce_r = sum(-F.log_softmax(ra[b, t], -1)[rl[b, t]]
               for b, t in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]) / 5  # fmt: skip
    loss, a, b = multitask_loss(la, ll, ra, rl, alpha=0.3)
    assert a.item() == pytest.approx(ce_l.item(), abs=1e-6)
    assert b.item() == pytest.approx(ce_r.item(), abs=1e-6)
    assert loss.item() == pytest.approx(0.3 * ce_l.item() + 0.7 * ce_r.item(), abs=1e-6)
    ra.requires_grad_(True)
    multitask_loss(la, ll, ra, rl, alpha=1.0)[0].backward()
    assert ra.grad.abs().max() == 0  # α = 1: the rationale task does not train


@pytest.mark.slow
def test_step_by_step_trains_and_eval_accuracy(student, tmp_path):
    rows = [
        {"question": f"What is {a} plus {b}?", "answer": "7", "rationale": f"{a} plus {b} makes 7."}
        for a, b in [(1, 6), (2, 5), (3, 4), (4, 3)]
    ]
    data, tasks = tmp_path / "r.jsonl", tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks.write_text("\n".join(json.dumps({"question": r["question"], "answer": "7"})
                               for r in rows) + "\n")  # fmt: skip
    out, report = tmp_path / "out", tmp_path / "rep.json"
    r = CliRunner().invoke(distill_cli, [str(a) for a in [
        "--method", "step-by-step", "--student", student, "--data", data, "-o", out,
        "--alpha", "0.5", "--steps", "40", "--lr", "3e-2", "--batch-size", "4", "--seq-len", "48",
        "--eval-data", tasks, "--no-progress", "--report", report]])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(report.read_text())["result"]
    assert res["eval_before"]["accuracy"] == 0.0
    assert res["eval_after"]["accuracy"] == 1.0, res["eval_after"]
    assert res["losses"][-1] < res["losses"][0] / 3
    r = CliRunner().invoke(eval_cli, ["accuracy", str(out), "--data", str(tasks), "--report",
                                      str(tmp_path / "acc.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "accuracy 1.0000 (4/4)" in r.output
    r = CliRunner().invoke(eval_cli, ["accuracy", str(out), "--data", str(tmp_path / "no.jsonl")])
    assert r.exit_code == 1 and "not found" in r.output
    assert math.isfinite(res["losses"][-1])


@pytest.mark.parametrize("alpha, task", [(1.0, "predict: "), (0.0, "explain: ")])
def test_zero_weight_task_is_not_run(student, tmp_path, monkeypatch, alpha, task):
    """α = 1 (label-only) or 0 runs one forward pass per step, and its loss is that task's CE."""
    from weightsmith.core.models import load_model, load_tokenizer
    from weightsmith.core.training.data import collate
    from weightsmith.distill import DistillConfig, distill
    from weightsmith.distill.losses import shift_for_next_token
    from weightsmith.distill.methods import base
    from weightsmith.distill.methods import step_by_step as sbs

    rows = [{"question": f"What is {a} plus 2?", "answer": str(a + 2),
             "rationale": f"{a} plus 2 makes {a + 2}."} for a in range(3)]  # fmt: skip
    data = tmp_path / "r.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(student)
    ref = load_model(student, torch.device("cpu"))
    ex = [e[0 if alpha == 1.0 else 1] for e in sbs.task_examples(rows, tok, 48)]
    b = collate(ex, tok.pad_token_id)
    with torch.no_grad():  # hand-computed: CE of the untrained student on that task alone
        logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        expected = F.cross_entropy(*[x.flatten(0, -2) if x.dim() == 3 else x.flatten()
                                     for x in shift_for_next_token(logits, b["labels"])],
                                   ignore_index=-100).item()  # fmt: skip
    seen: list[str] = []
    real_load = base.load_model

    def load_and_watch(*a, **k):
        model = real_load(*a, **k)
        model.register_forward_pre_hook(
            lambda m, args, kw: seen.extend(tok.batch_decode(kw["input_ids"][:, :9])),
            with_kwargs=True,
        )
        return model

    monkeypatch.setattr(base, "load_model", load_and_watch)
    cfg = DistillConfig(method="step-by-step", sbs_alpha=alpha, steps=2, lr=1e-3, batch_size=3,
                        seq_len=48)  # fmt: skip
    res = distill(None, student, data, tmp_path / "out", cfg, device="cpu", progress=False)
    assert len(seen) == 2 * 3 and all(s.startswith(task) for s in seen), seen
    assert res.losses[0] == pytest.approx(expected, abs=1e-5)
