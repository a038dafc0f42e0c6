"""End-to-end training on tiny models: loss goes down, outputs load in transformers, LoRA
merges like peft, gradient accumulation is exact, vocabulary rules hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightsmith.core.models import load_tokenizer
from weightsmith.core.training.data import read_records, tokenize_records
from weightsmith.distill import DistillConfig, LoraSettings, LossConfig, distill
from weightsmith.distill.losses import IGNORE_INDEX
from weightsmith.distill.vocab import plan_vocab
from weightsmith.errors import ConfigError
from weightsmith.io import open_checkpoint


def _cfg(**kw) -> DistillConfig:
    base = dict(steps=6, lr=1e-2, batch_size=4, seq_len=32, warmup_steps=1)
    return DistillConfig(**{**base, **kw})


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 11]])


def test_full_kd_lowers_loss_and_kl_and_output_loads(teacher, student, corpus, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(loss=LossConfig(loss="fkl", alpha=0.0, temperature=1.0), steps=8)
    res = distill(teacher, student, corpus, out, cfg, eval_data=corpus, progress=False)
    assert res.losses[-1] < res.losses[0] * 0.9, res.losses
    assert res.eval_after["kl_to_teacher"] < res.eval_before["kl_to_teacher"] * 0.9
    assert res.steps == 8 and res.tokens_per_s > 0
    assert 0 < res.train_peak_rss <= res.peak_rss  # training-phase peak, then the whole run
    # same tensors (names, shapes, dtypes) as the student checkpoint, and it loads
    with open_checkpoint(student) as a, open_checkpoint(out) as b:
        assert {n: (i.dtype, i.shape) for n, i in a.tensors.items()} == {
            n: (i.dtype, i.shape) for n, i in b.tensors.items()
        }
    assert not torch.equal(_logits(out, IDS), _logits(student, IDS))
    prov = json.loads((out / "weightsmith.json").read_text())
    assert prov["operation"] == "distill" and prov["config"]["version"] == 1
    assert prov["config"]["loss"]["loss"] == "fkl"
    assert prov["training"]["last_loss"] == res.losses[-1]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["rkl", "jsd"])
def test_other_divergences_train(teacher, student, corpus, tmp_path, loss):
    cfg = _cfg(loss=LossConfig(loss=loss, beta=0.5, alpha=0.0, temperature=2.0))
    res = distill(teacher, student, corpus, tmp_path / "o", cfg, progress=False)
    assert res.losses[-1] < res.losses[0], res.losses


def test_grad_accum_equals_one_big_batch(teacher, student, corpus, tmp_path):
    loss = LossConfig(loss="fkl", alpha=0.5, temperature=2.0)
    a = distill(teacher, student, corpus, tmp_path / "a", _cfg(loss=loss, steps=3, batch_size=4),
                progress=False)  # fmt: skip
    b = distill(teacher, student, corpus, tmp_path / "b",
                _cfg(loss=loss, steps=3, batch_size=2, grad_accum=2), progress=False)  # fmt: skip
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    with open_checkpoint(tmp_path / "a") as ca, open_checkpoint(tmp_path / "b") as cb:
        for name in ca.tensors:
            torch.testing.assert_close(
                ca.get_tensor(name), cb.get_tensor(name), atol=2e-6, rtol=1e-4
            )


def test_lora_merge_matches_peft_merge_and_unload(student, tmp_path):
    from peft import LoraConfig, get_peft_model

    from weightsmith.core.training.save import merged_weights, write_student
    from weightsmith.distill.lora import lora_deltas

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # peft initialises B = 0: make the delta non-trivial
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    deltas = lora_deltas(peft_model)
    assert len(deltas) == 7  # q k v o gate up down of the one layer
    write_student(student, tmp_path / "m", new_weights=merged_weights(student, deltas),
                  provenance={})  # fmt: skip
    reference = peft_model.merge_and_unload().state_dict()
    with open_checkpoint(tmp_path / "m") as ckpt:
        for name in ckpt.tensors:
            torch.testing.assert_close(ckpt.get_tensor(name), reference[name], atol=1e-6, rtol=0)


def test_lora_student_trains_and_merges(teacher, student, corpus, tmp_path):
    cfg = _cfg(lora=LoraSettings(r=4, alpha=8, dropout=0.0, targets="q,v"), lr=5e-2)
    res = distill(teacher, student, corpus, tmp_path / "o", cfg, eval_data=corpus, progress=False)
    assert res.eval_after["kl_to_teacher"] < res.eval_before["kl_to_teacher"]
    with open_checkpoint(student) as a, open_checkpoint(tmp_path / "o") as b:
        changed = {n for n in a.tensors if not torch.equal(a.get_tensor(n), b.get_tensor(n))}
    assert changed == {"model.layers.0.self_attn.q_proj.weight",
                       "model.layers.0.self_attn.v_proj.weight"}  # fmt: skip


def test_save_adapter_loads_with_peft(teacher, student, corpus, tmp_path):
    from peft import PeftModel

    cfg = _cfg(lora=LoraSettings(r=4, alpha=8, dropout=0.0), save_adapter=True, steps=3)
    distill(teacher, student, corpus, tmp_path / "ad", cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "weightsmith.json"
    ]  # fmt: skip
    prov = json.loads((tmp_path / "ad" / "weightsmith.json").read_text())
    assert prov["output"]["shards"] == ["adapter_model.safetensors"]
    assert prov["output_kind"] == "peft-adapter"
    base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    with torch.no_grad():
        plain = base(IDS).logits
    model = PeftModel.from_pretrained(base, tmp_path / "ad")
    with torch.no_grad():
        adapted = model(IDS).logits
    assert (adapted - plain).abs().max() > 1e-4  # the trained adapter changes the output
    # and it equals the merged output of the same run
    cfg_m = _cfg(lora=LoraSettings(r=4, alpha=8, dropout=0.0), steps=3)
    distill(teacher, student, corpus, tmp_path / "merged", cfg_m, progress=False)
    torch.testing.assert_close(_logits(tmp_path / "merged", IDS), adapted, atol=1e-5, rtol=1e-5)


def test_qlora_and_adamw8bit_train_on_cpu(teacher, student, corpus, tmp_path):
    cfg = _cfg(lora=LoraSettings(r=4, alpha=8, dropout=0.0), qlora=True, optim="adamw8bit",
               lr=5e-2)  # fmt: skip
    res = distill(teacher, student, corpus, tmp_path / "q", cfg, eval_data=corpus, progress=False)
    assert res.eval_after["kl_to_teacher"] < res.eval_before["kl_to_teacher"]
    logits = _logits(tmp_path / "q", IDS)
    assert torch.isfinite(logits).all()
    with open_checkpoint(tmp_path / "q") as c:
        assert c.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == "F32"


def test_prompt_tokens_and_padding_are_not_trained(pairs_jsonl, student):
    tok = load_tokenizer(student)
    examples = tokenize_records(read_records(pairs_jsonl), tok, 64)
    ex = examples[0]
    n_prompt = len(tok("Q: who went to the park?")["input_ids"])
    assert all(x == IGNORE_INDEX for x in ex.labels[:n_prompt])
    assert list(ex.labels[n_prompt:]) == list(ex.input_ids[n_prompt:])
    assert ex.labels[-1] == tok.eos_token_id


def test_prompt_completion_data_trains(teacher, student, pairs_jsonl, tmp_path):
    res = distill(teacher, student, pairs_jsonl, tmp_path / "o", _cfg(), progress=False)
    assert res.losses[-1] < res.losses[0]


def test_vocab_rules(teacher, student, padded_student, other_tokenizer_student):
    t, s = load_tokenizer(teacher), load_tokenizer(student)
    assert plan_vocab(t, s, 320, 320).note is None
    padded = plan_vocab(t, load_tokenizer(padded_student), 320, 384)
    assert padded.common == 320 and "padded" in padded.note
    with pytest.raises(ConfigError, match="--method seqkd"):
        plan_vocab(t, load_tokenizer(other_tokenizer_student), 320, 320)


def test_padded_student_distills_over_common_vocab(teacher, padded_student, corpus, tmp_path):
    res = distill(teacher, padded_student, corpus, tmp_path / "o", _cfg(steps=3), progress=False)
    assert any("padded embedding rows" in n for n in res.notes)
    assert res.losses[-1] < res.losses[0]


def test_seqkd_across_tokenizers(teacher, other_tokenizer_student, pairs_jsonl, tmp_path):
    cfg = _cfg(method="seqkd", gen_max_new_tokens=6, gen_temperature=0.0, steps=4)
    res = distill(teacher, other_tokenizer_student, pairs_jsonl, tmp_path / "o", cfg,
                  progress=False)  # fmt: skip
    assert "seqkd: teacher generated" in res.notes[0]
    assert res.losses[-1] < res.losses[0]
    assert torch.isfinite(_logits(tmp_path / "o", IDS[:, :4])).all()
