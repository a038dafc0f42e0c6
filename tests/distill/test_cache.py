"""The offline teacher cache: round trip against the live teacher, training from it, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightsmith.core.models import load_tokenizer
from weightsmith.core.training.data import collate, read_records, tokenize_records
from weightsmith.distill import CacheConfig, DistillConfig, LossConfig, TeacherCache, build_cache
from weightsmith.distill import distill as run_distill
from weightsmith.distill.cache import topk_of_logits
from weightsmith.errors import ConfigError


@pytest.fixture(scope="module")
def cache(teacher, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    info = build_cache(teacher, corpus, out, CacheConfig(top_k=8, temperature=2.0, seq_len=32,
                       chunk_examples=5), progress=False)  # fmt: skip
    return out, info


def test_topk_of_logits_hand_value():
    # softmax([ln 0.5, ln 0.3, ln 0.2]) at τ = 1, k = 1: top id 0, log 0.5, tail log 0.5
    top = topk_of_logits(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 1, 1.0)
    assert top.ids.tolist() == [[0]]
    assert top.logprobs.item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert top.tail_logmass.item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_cache_round_trip_matches_live_teacher(cache, teacher, corpus):
    path, info = cache
    tok = load_tokenizer(teacher)
    examples = tokenize_records(read_records(corpus), tok, 32)
    assert info["examples"] == len(examples) and info["meta"]["top_k"] == 8
    c = TeacherCache(path)
    assert len(c.ckpt.tensors) == 3 * math.ceil(len(examples) / 5)  # several chunks
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    idx = [0, 6, len(examples) - 1]  # rows from different chunks
    batch = collate([examples[i] for i in idx], tok.pad_token_id)
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    live = topk_of_logits(logits, 8, 2.0)
    ids, logp, tail = c.rows(idx, logits.shape[1])
    mask = batch["attention_mask"].bool()
    assert torch.equal(ids[mask], live.ids[mask])
    torch.testing.assert_close(logp[mask], live.logprobs[mask], atol=4e-3, rtol=1e-3)  # fp16
    torch.testing.assert_close(tail[mask], live.tail_logmass[mask], atol=1e-5, rtol=1e-5)
    # top-k + tail is a distribution: logsumexp over the k+1 buckets is 0 (fp16 log-probs)
    total = torch.logsumexp(torch.cat([logp[mask], tail[mask, None]], -1), -1)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=4e-3, rtol=0)
    c.close()


def test_training_from_cache_lowers_loss_and_bounds_online(cache, teacher, student, corpus,
                                                           tmp_path):  # fmt: skip
    path, _ = cache
    cfg = DistillConfig(loss=LossConfig(loss="fkl", alpha=0.5, temperature=2.0), steps=5,
                        lr=1e-2, batch_size=4, seq_len=32, warmup_steps=1)  # fmt: skip
    cached = run_distill(None, student, corpus, tmp_path / "c", cfg, teacher_cache=path,
                         eval_data=corpus, progress=False)  # fmt: skip
    online = run_distill(teacher, student, corpus, tmp_path / "o", cfg, progress=False)
    assert cached.eval_after["ce"] < cached.eval_before["ce"]
    # same first batch and student: the top-k divergence never exceeds the full one
    assert cached.losses[0] <= online.losses[0] + 1e-6
    assert cached.losses[0] > 0.9 * online.losses[0]  # and k = 8 captures most of it


def test_cache_refuses_mismatches(cache, teacher, student, corpus, pairs_jsonl, tmp_path):
    path, _ = cache
    cfg = DistillConfig(steps=1, batch_size=4, seq_len=32, loss=LossConfig(temperature=2.0))
    with pytest.raises(ConfigError, match="other data"):
        run_distill(None, student, pairs_jsonl, tmp_path / "a", cfg, teacher_cache=path)
    with pytest.raises(ConfigError, match=r"τ = 2\.0"):
        bad = DistillConfig(steps=1, batch_size=4, seq_len=32, loss=LossConfig(temperature=1.0))
        run_distill(None, student, corpus, tmp_path / "b", bad, teacher_cache=path)
    with pytest.raises(ConfigError, match="different teacher"):
        run_distill(student, student, corpus, tmp_path / "c", cfg, teacher_cache=path)
    assert not any(tmp_path.iterdir())
