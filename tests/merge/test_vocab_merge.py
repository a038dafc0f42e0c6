"""Vocabulary-aware merges (tokenizer_source / tokenizer: / chat_template) against mergekit 0.1.5.

Models whose tokenizers differ (a smaller base vocabulary, added and special tokens, padded
embeddings) are merged by mergekit-yaml (its own venv) and ``weightsmith merge run`` with the
same YAML: same vocabulary and ids, every tensor within 1e-6 (float32) / equal (bfloat16),
and the merged tokenizer encodes and decodes a fixed text the same way. Skipped without the
mergekit peer (fails under WEIGHTSMITH_REQUIRE_PEERS=1); the hand-checked tests below run always.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from merge_testlib import assert_one_line_error, run_cli, tensors
from mergekit_oracle import run_both

from weightsmith.testing import build_tiny_model
from weightsmith.testing.peers import require_peer

TEXT = "Once upon a time <x1> the cat<sp> sat <x2> on <y> the mat. Héllo — π!"
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _model(root: Path, name: str, seed: int, vocab: int, added=(), special=()) -> Path:
    """A tiny Llama whose tokenizer has ``min(vocab, 300)`` trained tokens plus ``added``
    and ``special`` tokens, the embedding resized to the tokenizer when tokens were added."""
    out = root / name
    if not (added or special):
        build_tiny_model(out, "llama", seed=seed, vocab_size=vocab, tie_word_embeddings=False)
        return out
    src = root / f"{name}-src"
    build_tiny_model(src, "llama", seed=seed, vocab_size=vocab, tie_word_embeddings=False)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    tok.add_tokens(list(added))
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vocab-models")
    _model(root, "a", 0, 320)  # 300 tokens, 320 rows (padding rows mergekit drops)
    _model(root, "b", 1, 320, added=("<x1>", "<x2>"), special=("<sp>",))
    _model(root, "c", 2, 320, added=("<x2>", "<y>"))
    _model(root, "small", 3, 260)  # a smaller trained vocabulary
    _model(root, "a2", 4, 320)
    return root


RECIPES = {
    "linear_union": {
        "merge_method": "linear",
        "models": [{"model": "a", "parameters": {"weight": 0.3}},
                   {"model": "b", "parameters": {"weight": 0.7}}],
        "tokenizer_source": "union",
        "dtype": "float32",
    },
    "ties_union_bf16": {
        "merge_method": "ties",
        "base_model": "a",
        "models": [{"model": "b", "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": "c", "parameters": {"weight": 0.4, "density": 0.7}}],
        "tokenizer_source": "union",
        "dtype": "bfloat16",
    },
    "task_arithmetic_block": {
        "merge_method": "task_arithmetic",
        "base_model": "a",
        "models": [{"model": "b", "parameters": {"weight": 0.5}},
                   {"model": "c", "parameters": {"weight": 0.8}}],
        "tokenizer": {
            "source": "union",
            "tokens": {
                "<x1>": {"source": {"kind": "zero"}},
                "<new>": {"source": {"kind": "model_token", "model": "b", "token": "<x2>"}},
                "<x2>": {"source": {"kind": "model_token", "model": "c", "token_id": 5},
                         "force": True},
            },
            "pad_to_multiple_of": 16,
        },
        "dtype": "float32",
    },
    "slerp_base": {
        "merge_method": "slerp",
        "base_model": "a",
        "models": [{"model": "a"}, {"model": "b"}],
        "parameters": {"t": 0.3},
        "tokenizer_source": "base",
        "dtype": "float32",
    },
    "linear_model_source": {
        "merge_method": "linear",
        "models": [{"model": "small", "parameters": {"weight": 1.0}},
                   {"model": "c", "parameters": {"weight": 2.0}}],
        "tokenizer_source": "c",
        "chat_template": "chatml",
        "dtype": "float32",
    },
    # base_model named: without one mergekit takes the "first" of a Python set of models as
    # the union's base, which varies between runs with more than two models
    "ties_small_base_union": {
        "merge_method": "ties",
        "base_model": "small",
        "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.6}},
                   {"model": "c", "parameters": {"weight": 0.25, "density": 0.9}}],
        "tokenizer_source": "union",
        "dtype": "float32",
    },
}  # fmt: skip


def _absolute(data, root: Path):
    """Model names made paths, in the tokenizer keys too (run_both does models/base_model)."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            named = k in ("model", "base_model", "tokenizer_source", "source")
            if named and isinstance(v, str) and v not in ("union", "base"):
                out[k] = str(root / v)
            else:
                out[k] = _absolute(v, root)
        return out
    if isinstance(data, list):
        return [_absolute(v, root) for v in data]
    return data


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    require_peer("mergekit")
    recipes = {k: _absolute(v, models) for k, v in RECIPES.items()}
    return run_both(recipes, Path("/"), tmp_path_factory.mktemp("vocab-runs"))


# mergekit's new ids are deterministic with two models; with three its order of models is a
# Python set's (and of tokens a hash map's), so there the comparison is by token.
SAME_IDS = {"linear_union", "slerp_base", "linear_model_source"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_same_vocabulary_and_tensors_as_mergekit(runs, name):
    mk, ws = runs[name]
    tm, tw = tensors(mk), tensors(ws)
    ok, wk = (transformers.AutoTokenizer.from_pretrained(p) for p in (mk, ws))
    vm, vw = ok.get_vocab(), wk.get_vocab()
    assert sorted(vm) == sorted(vw)
    if name in SAME_IDS:
        assert vm == vw
    order_m = torch.tensor([vm[t] for t in sorted(vw)])
    order_w = torch.tensor([vw[t] for t in sorted(vw)])
    assert sorted(tm) == sorted(tw)
    for key in tm:
        assert tm[key].shape == tw[key].shape and tm[key].dtype == tw[key].dtype, key
        a, b = tw[key].float(), tm[key].float()
        if key in (EMB, HEAD):  # rows by token, then the padding rows
            n = len(vw)
            torch.testing.assert_close(a[order_w], b[order_m], rtol=0, atol=1e-6, msg=key)
            a, b = a[n:], b[n:]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=key)
    ids_w, ids_m = wk(TEXT).input_ids, ok(TEXT).input_ids
    assert wk.convert_ids_to_tokens(ids_w) == ok.convert_ids_to_tokens(ids_m)
    assert wk.decode(ids_w) == ok.decode(ids_m)
    assert max(ids_w) < tw[EMB].shape[0]
    assert _config(ws)["vocab_size"] == _config(mk)["vocab_size"] == tw[EMB].shape[0]
    if RECIPES[name].get("chat_template"):
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        kw = {"tokenize": False, "add_generation_prompt": True}
        assert wk.apply_chat_template(chat, **kw) == ok.apply_chat_template(chat, **kw)
    transformers.AutoModelForCausalLM.from_pretrained(ws)


@pytest.mark.slow
def test_stories260k_with_extra_tokens_as_mergekit(tmp_path):
    """The real pair: stories260K + its Shakespeare fine-tune given two added tokens
    (embedding resized), TIES over the union, bfloat16 arithmetic."""
    from weightsmith.testing.shared import shared_dir

    shared = shared_dir()
    if shared is None:
        pytest.skip("needs ../shared (WEIGHTSMITH_SHARED)")
    require_peer("mergekit")
    src = shared / "models" / "stories260K-shakespeare"
    tok = transformers.AutoTokenizer.from_pretrained(src)
    tok.add_tokens(["<scene>", "<exit>"])
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    model.resize_token_embeddings(len(tok))
    extra = tmp_path / "shakespeare-extra"
    model.save_pretrained(extra)
    tok.save_pretrained(extra)
    recipe = {
        "merge_method": "ties",
        "base_model": str(shared / "models" / "stories260K"),
        "models": [{"model": str(extra), "parameters": {"weight": 0.8, "density": 0.5}}],
        "tokenizer_source": "union",
        "dtype": "bfloat16",
    }
    mk, ws = run_both({"stories": recipe}, Path("/"), tmp_path)["stories"]
    tm, tw = tensors(mk), tensors(ws)
    assert sorted(tm) == sorted(tw) and tw[EMB].shape == (514, 64)
    for key in tm:
        torch.testing.assert_close(tw[key].float(), tm[key].float(), rtol=0, atol=1e-6, msg=key)
    ok, wk = (transformers.AutoTokenizer.from_pretrained(p) for p in (mk, ws))
    assert wk.get_vocab() == ok.get_vocab()
    text = "Once upon a time <scene> Romeo said hi <exit>."
    assert wk(text).input_ids == ok(text).input_ids
    assert wk.decode(wk(text).input_ids, skip_special_tokens=False) == ok.decode(ok(text).input_ids)


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_builtin_chat_templates_render_like_mergekits(name):
    from weightsmith.merge.vocab_config import BUILTIN_TEMPLATES
    from weightsmith.testing import train_tiny_tokenizer
    from weightsmith.testing.peers import peer_python

    require_peer("mergekit")
    found = list(peer_python("mergekit").parent.parent.glob(
        f"lib/python*/site-packages/mergekit/_data/chat_templates/{name}.jinja"))  # fmt: skip
    assert found, "mergekit's chat templates are missing from its venv"
    tok = train_tiny_tokenizer(300)
    chat = [{"role": "system", "content": " sys "}, {"role": "user", "content": "hi\n"},
            {"role": "assistant", "content": "yo"}]  # fmt: skip
    for gen in (True, False):
        ours, theirs = (
            tok.apply_chat_template(
                chat, chat_template=t, tokenize=False, add_generation_prompt=gen
            )
            for t in (BUILTIN_TEMPLATES[name], found[0].read_text())
        )
        assert ours == theirs


def _config(path: Path) -> dict:
    import json

    return json.loads((Path(path) / "config.json").read_text())


# ---------------------------------------------------------------------- hand-checked
def test_union_rows_by_token(models, tmp_path):
    """linear a + b over the union: shared tokens average, b's own tokens keep b's rows,
    a's padding rows are dropped (mergekit's vocabulary is the tokenizer's)."""
    out = tmp_path / "out"
    r = run_cli("linear", models / "a", models / "b", "--tokenizer-source", "union", "-o", out)
    assert r.exit_code == 0, r.output
    ta, tb, to = tensors(models / "a"), tensors(models / "b"), tensors(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    tb_tok = transformers.AutoTokenizer.from_pretrained(models / "b")
    assert len(tok) == 303 == to[EMB].shape[0]
    for name in (EMB, HEAD):
        torch.testing.assert_close(
            to[name][:300], (ta[name][:300] + tb[name][:300]) / 2, rtol=0, atol=1e-7
        )
        for t in ("<x1>", "<x2>", "<sp>"):
            assert torch.equal(to[name][tok.convert_tokens_to_ids(t)],
                               tb[name][tb_tok.convert_tokens_to_ids(t)]), t  # fmt: skip
    assert tok(TEXT).input_ids == tb_tok(TEXT).input_ids  # same tokens, same ids here


def test_chat_template_without_a_vocabulary_merge(models, tmp_path):
    """--chat-template re-saves the reference's tokenizer with the template (mergekit's
    _copy_tokenizer fallback); auto picks the inputs' most common one (none here: unchanged)."""
    from weightsmith.merge.vocab_config import BUILTIN_TEMPLATES

    out = tmp_path / "out"
    r = run_cli("linear", models / "a", models / "a2", "--chat-template", "chatml", "-o", out)
    assert r.exit_code == 0, r.output
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == BUILTIN_TEMPLATES["chatml"]
    assert tok.get_vocab() == transformers.AutoTokenizer.from_pretrained(models / "a").get_vocab()
    assert tensors(out)[EMB].shape == (320, 64)  # no vocabulary merge: rows by id, as stored
    out2 = tmp_path / "out2"
    r = run_cli("linear", out, models / "a2", "--chat-template", "auto", "-o", out2)
    assert r.exit_code == 0, r.output
    assert transformers.AutoTokenizer.from_pretrained(out2).chat_template == tok.chat_template


def test_bad_vocabulary_inputs_are_one_line_errors(models, tmp_path):
    out = tmp_path / "out"
    bad = {
        "a tokens source naming a missing model": (
            "merge_method: linear\nmodels: [{model: a}, {model: b}]\n"
            "tokenizer: {tokens: {'<q>': {source: nowhere}}}\n",
            "not found",
        ),
        "a tokens source that is not merged": (
            "merge_method: linear\nmodels: [{model: a}, {model: b}]\n"
            "tokenizer: {tokens: {'<q>': {source: c}}}\n",
            "not one of the models being merged",
        ),
        "chat template that does not parse": (
            "merge_method: linear\nmodels: [{model: a}, {model: b}]\n"
            "chat_template: '{% for m in messages %}{{ m.content }'\n",
            "does not parse",
        ),
        "both keys": (
            "merge_method: linear\nmodels: [{model: a}, {model: b}]\n"
            "tokenizer_source: union\ntokenizer: {source: base}\n",
            "not both",
        ),
    }
    for what, (text, needle) in bad.items():
        cfg = tmp_path / "r.yml"
        cfg.write_text(text)
        r = run_cli("run", cfg, "--models-dir", models, "-o", out)
        assert_one_line_error(r, needle)
        assert not out.exists(), what
