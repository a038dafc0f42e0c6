"""An offline teacher cache: the teacher's top-k next-token log-probs per position, on disk.

Layout (a directory written atomically by :class:`CheckpointWriter`, readable with
``open_checkpoint``): sharded safetensors holding, per chunk of examples,

- ``chunk{c}.topk_ids``       (n, T, k) int16 (int32 when the vocabulary needs it)
- ``chunk{c}.topk_logprobs``  (n, T, k) float16, log p_T at temperature τ
- ``chunk{c}.tail_logmass``   (n, T)    float32, log(1 − Σ top-k p_T)

where position t holds the distribution over token t+1 (the logits at t), plus
``distill_cache.json`` with the fingerprints a training run must match: teacher checkpoint,
tokenizer, data (file bytes + tokenizer + seq_len), vocabulary length, τ and k.
At k = 32 that is 32·(2+2)+4 = 132 bytes per position with int16 ids.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from weightsmith.core.device import select_device
from weightsmith.core.models import load_model, load_tokenizer, logits_width
from weightsmith.core.report import peak_rss_bytes
from weightsmith.core.training.data import (
    collate,
    data_fingerprint,
    read_records,
    tokenize_records,
)
from weightsmith.distill.vocab import tokenizer_hash
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.reader import open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec

CACHE_META = "distill_cache.json"
CACHE_FORMAT = "weightsmith-distill-cache"
CACHE_VERSION = 1


@dataclass(frozen=True)
class CacheConfig:
    top_k: int = 32
    temperature: float = 2.0  # the loss τ the cache serves (must match the training run)
    seq_len: int = 512
    batch_size: int = 8
    chunk_examples: int = 256  # examples per stored chunk
    version: int = 1


@dataclass(frozen=True)
class TopK:
    """The teacher's compressed distribution at one position (pure function, testable)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor


def topk_of_logits(logits: torch.Tensor, k: int, temperature: float) -> TopK:
    """Top-k log-probs of softmax(logits/τ) and the log of the mass outside them."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    top, ids = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    return TopK(ids, top, tail)


def build_cache(
    teacher: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: CacheConfig,
    *,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> dict:
    """Run the teacher once over ``data`` and write its top-k distributions to ``out``."""
    if cfg.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {cfg.top_k}")
    if not cfg.temperature > 0:
        raise ConfigError(f"--temperature must be positive, got {cfg.temperature}")
    start = time.perf_counter()
    dev = select_device(device)
    tok = load_tokenizer(teacher)
    records = read_records(data)
    examples = tokenize_records(records, tok, cfg.seq_len)
    t_hash = tokenizer_hash(tok)
    with open_checkpoint(teacher) as ckpt:
        teacher_fp = ckpt.fingerprint()
        model = load_model(teacher, dev)
        vocab = logits_width(model)
        if cfg.top_k > vocab:
            raise ConfigError(f"--top-k {cfg.top_k} exceeds the teacher's {vocab} logits")
        id_dtype = torch.int16 if vocab <= 2**15 else torch.int32
        n = len(examples)
        meta = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "teacher_fingerprint": teacher_fp,
            "tokenizer_hash": t_hash,
            "data_fingerprint": data_fingerprint(records, t_hash, cfg.seq_len),
            "vocab_length": vocab,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "seq_len": cfg.seq_len,
            "examples": n,
            "chunk_examples": cfg.chunk_examples,
        }
        with CheckpointWriter(out, max_shard_size=max_shard_size, force=force,
                              inputs=[ckpt.path]) as writer:  # fmt: skip
            tokens = _write_chunks(writer, model, examples, tok.pad_token_id, cfg, id_dtype, dev,
                                   progress)  # fmt: skip
            writer.write_json(CACHE_META, meta)
            summary = writer.commit(
                {
                    "operation": "distill-cache",
                    "config": asdict(cfg),
                    "inputs": [
                        {"path": str(ckpt.path), "fingerprint": teacher_fp},
                        {"path": str(data), "fingerprint": records.fingerprint},
                    ],
                }
            )
    return {
        "output": summary.out,
        "examples": n,
        "positions": tokens,
        "bytes": summary.total_size,
        "bytes_per_position": round(summary.total_size / max(n * cfg.seq_len, 1), 1),
        "wall_s": round(time.perf_counter() - start, 3),
        "peak_rss": peak_rss_bytes(),
        "meta": meta,
    }


def _write_chunks(writer, model, examples, pad_id: int, cfg: CacheConfig, id_dtype, dev,
                  progress: bool) -> int:  # fmt: skip
    """Plan and write every chunk's top-k tensors; the number of real positions covered."""
    T, k, n = cfg.seq_len, cfg.top_k, len(examples)
    chunks = [(c, min(cfg.chunk_examples, n - c)) for c in range(0, n, cfg.chunk_examples)]
    specs = []
    for c, size in chunks:
        name = f"chunk{c // cfg.chunk_examples:05d}"
        specs += [
            TensorSpec(f"{name}.topk_ids", id_dtype, (size, T, k)),
            TensorSpec(f"{name}.topk_logprobs", torch.float16, (size, T, k)),
            TensorSpec(f"{name}.tail_logmass", torch.float32, (size, T)),
        ]
    writer.plan(specs)
    tokens = 0
    with tqdm(total=n, desc="teacher cache", unit="ex", disable=not progress, leave=False) as bar:
        for c, size in chunks:
            name = f"chunk{c // cfg.chunk_examples:05d}"
            ids = torch.zeros((size, T, k), dtype=id_dtype)
            logp = torch.full((size, T, k), -math.inf, dtype=torch.float16)
            tail = torch.zeros((size, T), dtype=torch.float32)
            for b in range(0, size, cfg.batch_size):
                part = examples[c + b : c + min(b + cfg.batch_size, size)]
                batch = collate(part, pad_id)
                with torch.no_grad():
                    logits = model(
                        input_ids=batch["input_ids"].to(dev),
                        attention_mask=batch["attention_mask"].to(dev),
                    ).logits
                top = topk_of_logits(logits, k, cfg.temperature)
                w = logits.shape[1]
                rows = slice(b, b + len(part))
                ids[rows, :w] = top.ids.to("cpu", id_dtype)
                logp[rows, :w] = top.logprobs.to("cpu", torch.float16)
                tail[rows, :w] = top.tail_logmass.cpu()
                tokens += int(batch["attention_mask"].sum())
                bar.update(len(part))
            writer.write(f"{name}.topk_ids", ids)
            writer.write(f"{name}.topk_logprobs", logp)
            writer.write(f"{name}.tail_logmass", tail)
    return tokens


class TeacherCache:
    """Read rows of a cache; :meth:`check` refuses one built for other data/tokenizer/τ."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta_path = self.path / CACHE_META
        if not meta_path.is_file():
            raise CheckpointError(f"{self.path}: not a teacher cache (no {CACHE_META})")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
        if self.meta.get("format") != CACHE_FORMAT or self.meta.get("version") != CACHE_VERSION:
            raise CheckpointError(f"{meta_path}: not a version-{CACHE_VERSION} teacher cache")
        self.ckpt = open_checkpoint(self.path)
        self.chunk = int(self.meta["chunk_examples"])

    def check(
        self,
        *,
        data_fingerprint: str,
        tokenizer_hash: str,
        temperature: float,
        teacher_fingerprint: str | None = None,
    ) -> None:
        m = self.meta
        if m["tokenizer_hash"] != tokenizer_hash:
            raise ConfigError(f"{self.path}: cache was built with a different tokenizer")
        if m["data_fingerprint"] != data_fingerprint:
            raise ConfigError(
                f"{self.path}: cache was built for other data or --seq-len "
                f"(cache seq_len {m['seq_len']}); rebuild it with distill cache"
            )
        if not math.isclose(float(m["temperature"]), temperature, rel_tol=1e-9):
            raise ConfigError(
                f"{self.path}: cache holds τ = {m['temperature']} log-probs but --temperature "
                f"is {temperature}"
            )
        if teacher_fingerprint is not None and m["teacher_fingerprint"] != teacher_fingerprint:
            raise ConfigError(f"{self.path}: cache was built from a different teacher")

    def rows(self, indices: list[int], width: int) -> tuple[torch.Tensor, ...]:
        """(ids, logprobs, tail) of examples ``indices``, first ``width`` positions."""
        out: list[list[torch.Tensor]] = [[], [], []]
        for i in indices:
            name = f"chunk{i // self.chunk:05d}"
            row = i % self.chunk
            for j, field in enumerate(("topk_ids", "topk_logprobs", "tail_logmass")):
                sl = self.ckpt.get_slice(f"{name}.{field}")
                out[j].append(sl[row : row + 1, :width])
        ids, logp, tail = (torch.cat(parts) for parts in out)
        return ids.long(), logp.float(), tail.float()

    def close(self) -> None:
        self.ckpt.close()
