"""Preference pairs (TRL's ``prompt``/``chosen``/``rejected`` JSON lines) and the on-disk cache of
the reference model's log-probs, so DPO never keeps the reference model resident.

Reference cache layout (a folder written atomically by :class:`CheckpointWriter`):

- ``chosen_logps``, ``rejected_logps``  (N,) float32: Σ log π_ref over the completion tokens
- ``chosen_tokens``, ``rejected_tokens`` (N,) int32: how many tokens (IPO averages)
- ``ref_logps.json``: the fingerprints a training run must match (reference checkpoint,
  tokenizer, pairs file bytes + ``seq_len``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from weightsmith.core.jsonl import json_objects
from weightsmith.core.models import load_model, load_tokenizer
from weightsmith.core.training.data import Example, collate
from weightsmith.core.training.losses import IGNORE_INDEX, shift_for_next_token
from weightsmith.distill.dpo import sequence_logps
from weightsmith.distill.vocab import tokenizer_hash
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.reader import open_checkpoint
from weightsmith.io.writer import CheckpointWriter, TensorSpec

REF_META = "ref_logps.json"
REF_FORMAT = "weightsmith-ref-logps"
REF_VERSION = 1
FIELDS = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")


@dataclass(frozen=True)
class PreferencePairs:
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    fingerprint: str  # sha256 of the file bytes

    def __len__(self) -> int:
        return len(self.prompts)


def read_pairs(path: str | os.PathLike[str]) -> PreferencePairs:
    """Read a ``.jsonl`` of ``{"prompt", "chosen", "rejected"}`` strings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: preference file not found")
    raw = path.read_bytes()
    prompts, chosen, rejected = [], [], []
    for lineno, obj in json_objects(path, raw.decode("utf-8", errors="replace")):
        if not (isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in FIELD_KEYS)):
            raise ConfigError(
                f"{path}:{lineno}: expected 'prompt', 'chosen' and 'rejected' strings"
            )
        if obj["chosen"] == obj["rejected"]:
            raise ConfigError(f"{path}:{lineno}: chosen and rejected are identical")
        prompts.append(obj["prompt"])
        chosen.append(obj["chosen"])
        rejected.append(obj["rejected"])
    if not prompts:
        raise ConfigError(f"{path}: no preference pairs")
    return PreferencePairs(prompts, chosen, rejected, "sha256:" + hashlib.sha256(raw).hexdigest())


FIELD_KEYS = ("prompt", "chosen", "rejected")


def tokenize_completion(tok, prompt: str, completion: str, seq_len: int) -> Example:
    """Prompt (label -100) + completion + EOS, truncated to ``seq_len`` (as data.py does)."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        c = [*c, tok.eos_token_id]
    ids = (p + c)[:seq_len]
    labels = ([IGNORE_INDEX] * len(p) + c)[:seq_len]
    return Example(tuple(ids), tuple(labels))


def tokenize_pairs(pairs: PreferencePairs, tok, seq_len: int) -> list[tuple[Example, Example]]:
    out = []
    for i in range(len(pairs)):
        c = tokenize_completion(tok, pairs.prompts[i], pairs.chosen[i], seq_len)
        r = tokenize_completion(tok, pairs.prompts[i], pairs.rejected[i], seq_len)
        for e in (c, r):
            if not any(x != IGNORE_INDEX for x in e.labels[1:]):
                raise ConfigError(
                    f"pair {i}: the prompt fills --seq-len {seq_len}; no completion token is left"
                )
        out.append((c, r))
    return out


def pairs_fingerprint(pairs: PreferencePairs, tok_hash: str, seq_len: int) -> str:
    blob = f"{pairs.fingerprint}|{tok_hash}|{seq_len}|{REF_VERSION}".encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


@torch.no_grad()
def pair_logps(
    model, examples: list[tuple[Example, Example]], pad_id: int, dev, batch_size: int,
    progress: bool = False, desc: str = "log-probs",
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Σ log p over completion tokens (and token counts) of every chosen and rejected example."""
    out = {k: [] for k in FIELDS}
    bar = tqdm(total=len(examples), desc=desc, unit="pair", disable=not progress, leave=False)
    with bar:
        for b in range(0, len(examples), batch_size):
            part = examples[b : b + batch_size]
            logps, counts = batch_logps(model, part, pad_id, dev)
            n = len(part)
            out["chosen_logps"].append(logps[:n].cpu())
            out["rejected_logps"].append(logps[n:].cpu())
            out["chosen_tokens"].append(counts[:n].cpu())
            out["rejected_tokens"].append(counts[n:].cpu())
            bar.update(n)
    return {
        k: torch.cat(v).to(torch.float32 if k.endswith("logps") else torch.int32)
        for k, v in out.items()
    }


def batch_logps(model, part: list[tuple[Example, Example]], pad_id: int, dev):
    """Forward chosen rows then rejected rows in one batch: (2n,) sums and (2n,) counts."""
    batch = collate([c for c, _ in part] + [r for _, r in part], pad_id)
    logits = model(
        input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)
    ).logits
    logits, labels = shift_for_next_token(logits, batch["labels"].to(dev))
    return sequence_logps(logits, labels)


def build_ref_logps(
    ref: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    device: torch.device | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Run the reference model once over every pair and store its log-probs in ``out``."""
    start = time.perf_counter()
    dev = device or torch.device("cpu")
    tok = load_tokenizer(ref)
    pairs = read_pairs(data)
    t_hash = tokenizer_hash(tok)
    examples = tokenize_pairs(pairs, tok, seq_len)
    with open_checkpoint(ref) as ckpt:
        ref_fp = ckpt.fingerprint()
        ref_path = ckpt.path
    model = load_model(ref, dev)
    values = pair_logps(model, examples, tok.pad_token_id, dev, batch_size, progress,
                        desc="reference log-probs")  # fmt: skip
    del model  # the reference model is never resident during training
    gc.collect()
    meta = {
        "format": REF_FORMAT,
        "version": REF_VERSION,
        "ref_fingerprint": ref_fp,
        "tokenizer_hash": t_hash,
        "data_fingerprint": pairs_fingerprint(pairs, t_hash, seq_len),
        "seq_len": seq_len,
        "pairs": len(pairs),
    }
    with CheckpointWriter(out, max_shard_size=1 << 62, force=force, inputs=[ref_path]) as w:
        w.plan([TensorSpec.of(k, v) for k, v in values.items()])
        for k, v in values.items():
            w.write(k, v)
        w.write_json(REF_META, meta)
        summary = w.commit({"operation": "distill-ref-logps", "ref": str(ref_path),
                            "data": str(data), "meta": meta})  # fmt: skip
    return {"output": summary.out, "pairs": len(pairs), "wall_s": round(time.perf_counter() - start, 3),
            "meta": meta}  # fmt: skip


class RefLogps:
    """A reference log-prob cache; :meth:`check` refuses one built for other pairs/model/tokenizer."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta_path = self.path / REF_META
        if not meta_path.is_file():
            raise CheckpointError(f"{self.path}: not a reference log-prob cache (no {REF_META})")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
        if self.meta.get("format") != REF_FORMAT or self.meta.get("version") != REF_VERSION:
            raise CheckpointError(f"{meta_path}: not a version-{REF_VERSION} reference cache")
        with open_checkpoint(self.path) as ckpt:
            missing = [k for k in FIELDS if k not in ckpt.tensors]
            if missing:
                raise CheckpointError(f"{self.path}: reference cache lacks {missing[0]!r}")
            self.values = {k: ckpt.get_tensor(k) for k in FIELDS}
        n = int(self.meta["pairs"])
        if any(v.shape != (n,) for v in self.values.values()):
            raise CheckpointError(f"{self.path}: reference cache tensors do not hold {n} pairs")

    def check(self, *, data_fingerprint: str, tokenizer_hash: str, ref_fingerprint: str | None):
        m = self.meta
        if m["tokenizer_hash"] != tokenizer_hash:
            raise ConfigError(f"{self.path}: reference cache was built with a different tokenizer")
        if m["data_fingerprint"] != data_fingerprint:
            raise ConfigError(
                f"{self.path}: reference cache was built for other pairs or --seq-len "
                f"(cache seq_len {m['seq_len']}); delete it or give another --ref-cache"
            )
        if ref_fingerprint is not None and m["ref_fingerprint"] != ref_fingerprint:
            raise ConfigError(
                f"{self.path}: reference cache was built from a different --ref model"
            )
