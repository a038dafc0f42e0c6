"""Text-only evaluation of multimodal checkpoints (tiny seeded Qwen2.5-VL, Gemma 3, LLaVA):
transformers' ``AutoModelForCausalLM`` does not map Qwen2.5-VL or LLaVA, so the loader falls
back to the model's own class (``AutoModelForImageTextToText``), whose forward takes text alone.
``weightsmith eval ppl`` on a quantized output (with the original as ``--reference``) equals
the same perplexity, KL and top-1 agreement computed here by hand with transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoTokenizer

from weightsmith.cli.main import cli
from weightsmith.core.models import load_model
from weightsmith.testing.multimodal import MULTIMODAL_ARCHS, build_tiny_multimodal, model_class

TEXT = (
    "The quick brown fox jumps over the lazy dog. A tiny model reads a few sentences, "
    "and the evaluation counts how surprised it is by each next token in every window. "
) * 4
SEQ = 16


def _cli(args: list[str]) -> str:
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return res.output


def _sharpened(kind: str, root) -> object:
    """A tiny seeded ``kind`` whose output embedding is scaled so that its logits' std is ~2:
    the N(0, 0.02) weights give logits of ~1e-2 (a near-uniform next-token distribution, where
    perplexity hardly depends on the model); scaled, quantization moves the KL. (Gemma 3 ties
    the embeddings, so the scale reaches its inputs too: measured std 1.7 there.)"""
    src = build_tiny_multimodal(root / "seed", kind, seed=0)
    model = model_class(kind).from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        std = model(input_ids=torch.tensor([list(range(2, 34))])).logits.std().item()
        model.get_output_embeddings().weight.mul_(2.0 / std)
    model.save_pretrained(root / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / "m" / f).write_bytes((src / f).read_bytes())
    return root / "m"


def _by_hand(kind: str, model_dir, ref_dir, data) -> tuple[float, float, float]:
    """Perplexity, mean KL(ref || model) and top-1 agreement over non-overlapping windows of
    SEQ tokens (every token after a window's first predicted), with the models' own classes."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tok(data.read_text())["input_ids"])
    windows = ids[: ids.numel() // SEQ * SEQ].view(-1, SEQ)
    cls = model_class(kind)
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    ref = cls.from_pretrained(ref_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
        ref_logp = F.log_softmax(ref(input_ids=windows).logits[:, :-1].float(), -1)
    targets = windows[:, 1:]
    nll = -logp.gather(-1, targets[..., None]).mean().item()
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
    agree = (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item() / targets.numel()
    return math.exp(nll), kl, agree


@pytest.mark.parametrize("kind", MULTIMODAL_ARCHS)
def test_eval_ppl_on_quantized_multimodal_equals_by_hand(tmp_path, kind) -> None:
    """RTN 4-bit output of a tiny multimodal model: ``eval ppl --reference <original>`` loads
    both in their own class and reports the perplexity, KL and agreement computed by hand
    (rel 1e-5; float32 sums in a different order), over 27 windows of 16 tokens."""
    pytest.importorskip("compressed_tensors")
    src = _sharpened(kind, tmp_path)
    _cli(["compress", "quantize", str(src), "-o", str(tmp_path / "q"), "--method", "rtn",
          "--group-size", "32", "--no-progress"])  # fmt: skip
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = _cli(["eval", "ppl", str(tmp_path / "q"), "--data", str(data), "--seq-len", str(SEQ),
                "--reference", str(src), "--json", "--no-progress"])  # fmt: skip
    got = json.loads(out[out.index("{") :])
    ppl, kl, agree = _by_hand(kind, tmp_path / "q", src, data)
    assert got["seq_len"] == SEQ and got["windows"] >= 4
    assert got["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert got["kl"] == pytest.approx(kl, rel=1e-4) and got["kl"] > 1e-6  # quantized
    assert got["top1_agreement"] == pytest.approx(agree, abs=1e-9)


def test_load_model_uses_the_multimodal_class(tmp_path) -> None:
    """distill, generate and the accuracy evals load through ``load_model``: a Qwen2.5-VL
    checkpoint comes back in its own class, frozen, and runs on text alone."""
    src = build_tiny_multimodal(tmp_path / "m", "qwen2_5_vl", seed=0)
    model = load_model(src, torch.device("cpu"))
    assert type(model) is model_class("qwen2_5_vl")
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 17, 42, 99]])).logits
    assert logits.shape == (1, 4, model.get_output_embeddings().weight.shape[0])


def test_distill_trains_the_text_decoder_of_a_multimodal_student(tmp_path) -> None:
    """KD (forward KL, 4 steps) from a tiny Qwen2.5-VL teacher into a Qwen2.5-VL student: the
    student loads in its own class, trains on text alone (its KL to the teacher on the corpus
    goes down), and saves under the checkpoint's
    names (``model.layers.N``, mapped from the class's ``model.language_model.layers.N``): the
    text decoder changes, every vision tensor is byte-identical (it sees no gradient), and the
    output loads in its own class and runs a forward pass with an image."""
    from weightsmith.distill import DistillConfig, LossConfig, distill
    from weightsmith.io import open_checkpoint
    from weightsmith.testing.multimodal import image_inputs

    teacher = _sharpened("qwen2_5_vl", tmp_path / "t")
    student = build_tiny_multimodal(tmp_path / "s", "qwen2_5_vl", seed=1)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": s + "."}) + "\n" for s in TEXT.split(".")[:8]))
    cfg = DistillConfig(steps=4, lr=1e-2, batch_size=4, seq_len=32, warmup_steps=1,
                        loss=LossConfig(loss="fkl", alpha=0.0, temperature=1.0))  # fmt: skip
    res = distill(teacher, student, corpus, tmp_path / "o", cfg, eval_data=corpus, progress=False)
    assert res.eval_after["kl_to_teacher"] < res.eval_before["kl_to_teacher"]
    with open_checkpoint(student) as a, open_checkpoint(tmp_path / "o") as b:
        assert set(a.tensors) == set(b.tensors)
        changed = {n for n in a.tensors if not torch.equal(a.get_tensor(n), b.get_tensor(n))}
    assert changed and all(n.startswith(("model.layers.", "model.norm", "lm_head")) or
                           n == "model.embed_tokens.weight" for n in changed)  # fmt: skip
    assert any(n.startswith("model.layers.") for n in changed)
    model = model_class("qwen2_5_vl").from_pretrained(tmp_path / "o", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**image_inputs("qwen2_5_vl")).logits).all()
