"""Fixtures for distillation tests: a tiny teacher that has learned something, tiny students,
and small text files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from weightsmith.testing import build_tiny_model, train_tiny_tokenizer
from weightsmith.testing.tiny import TOKENIZER_CORPUS


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(TOKENIZER_CORPUS[:12]), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def pairs_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [
        {"prompt": "Q: who went to the park?", "completion": " Lily and Tom went to the park."},
        {"prompt": "Q: what did the student do?", "completion": " The student learns."},
    ] * 4
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def teacher(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A 2-layer llama trained a few CE steps on the corpus (sharper than a random init)."""
    from weightsmith.distill import DistillConfig, LossConfig, distill

    root = tmp_path_factory.mktemp("teacher")
    base = build_tiny_model(root / "base", "llama", seed=0)
    cfg = DistillConfig(loss=LossConfig(alpha=1.0), steps=12, lr=1e-2, batch_size=8, seq_len=32)
    distill(None, base, corpus, root / "teacher", cfg, progress=False)
    return root / "teacher"


@pytest.fixture(scope="session")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer llama with the same tokenizer as the teacher."""
    return build_tiny_model(
        tmp_path_factory.mktemp("student") / "s", "llama", seed=1, num_hidden_layers=1
    )


@pytest.fixture(scope="session")
def other_tokenizer_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_tiny_model(
        tmp_path_factory.mktemp("other") / "s", "llama", seed=2, num_hidden_layers=1,
        with_tokenizer=False,
    )  # fmt: skip
    train_tiny_tokenizer(280).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def padded_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same tokenizer, 384 output rows instead of 320 (padded embeddings, the Qwen case)."""
    return build_tiny_model(
        tmp_path_factory.mktemp("padded") / "s", "llama", seed=3, num_hidden_layers=1,
        vocab_size=384,
    )  # fmt: skip


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def prefs_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 pairs sharing one preference (happy cat over sad dog) on different prompts."""
    names = ["Lily", "Tom", "Ben", "Sue", "Max", "Mia", "Sam", "Ann", "Tim", "Zoe", "Kim", "Joe"]
    rows = [
        {"prompt": f"Q: how is {n}'s pet?", "chosen": " The cat is happy.",
         "rejected": " The dog is sad."}
        for n in names
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path
