"""Perplexity with the standard protocol, and KL / top-1 agreement against a reference model.

Protocol (as in the GPTQ and Wanda papers' WikiText-2 numbers): the whole file is tokenized
once (with the tokenizer's default special tokens, e.g. Llama's leading BOS), optionally cut to
``max_tokens``, and split into non-overlapping windows of ``seq_len`` tokens (a trailing partial
window is dropped unless it is the only one). Within each window every token after the first is
predicted; perplexity is ``exp`` of the mean negative log-likelihood over all predicted tokens.

With a reference model (same tokenizer/vocabulary), the same windows also give the mean
KL(reference || model) per predicted token and the fraction of positions where both models' most
likely next token agrees — the way llama.cpp's ``perplexity --kl-divergence`` judges quants.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from weightsmith.core.calibration_data import read_text_file
from weightsmith.core.models import load_causal_lm, load_tokenizer
from weightsmith.core.report import peak_rss_bytes
from weightsmith.errors import ConfigError


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`perplexity` measured. ``tokens`` counts predicted tokens."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    data: str
    model: str
    wall_s: float
    peak_rss: int
    reference: str | None = None
    reference_ppl: float | None = None
    kl: float | None = None  # mean KL(reference || model) in nats per token
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping ``(n, seq_len)`` windows of a 1-D token stream (see module docstring)."""
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2 (got {seq_len})")
    if max_tokens is not None:
        if max_tokens < 2:
            raise ConfigError(f"--max-tokens must be at least 2 (got {max_tokens})")
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ConfigError("the evaluation text is shorter than 2 tokens")
    n = ids.numel() // seq_len
    if n == 0:
        return ids.unsqueeze(0)
    return ids[: n * seq_len].view(n, seq_len)


def _read_text(data: str | os.PathLike[str], max_tokens: int | None) -> str:
    text = read_text_file(data, "--data")
    if max_tokens is not None:
        text = text[: max_tokens * 32]  # a token is rarely longer than 32 characters
    return text


def perplexity(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    seq_len: int = 512,
    max_tokens: int | None = None,
    reference: str | os.PathLike[str] | None = None,
    batch_size: int = 1,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> PerplexityResult:
    """Perplexity of ``model`` on the text file ``data``; with ``reference``, also the mean
    KL divergence and top-1 agreement of ``model`` against it on the same windows. The
    forward passes run on ``device``; each batch's sums are added up on the host."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(model)
    tokenizer.model_max_length = 1 << 62  # we window the stream ourselves; silence the warning
    text = _read_text(data, max_tokens)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    windows = token_windows(ids, seq_len, max_tokens)
    lm = load_causal_lm(model).to(device)
    check_token_range(lm, ids, f"{model}", len(tokenizer))
    ref = load_causal_lm(reference).to(device) if reference is not None else None
    if ref is not None:
        check_token_range(ref, ids, f"--reference {reference}", len(tokenizer))
    windows = windows.to(device)
    nll_sum, ref_nll_sum, kl_sum, agree, count = 0.0, 0.0, 0.0, 0, 0
    with torch.no_grad():
        for s in tqdm(
            range(0, windows.shape[0], batch_size), disable=not progress, desc="eval", leave=False
        ):
            batch = windows[s : s + batch_size]
            targets = batch[:, 1:].reshape(-1)
            logp = _log_probs(lm, batch)
            nll_sum += -logp.gather(1, targets[:, None]).sum().item()
            count += targets.numel()
            if ref is not None:
                ref_logp = _log_probs(ref, batch)
                if ref_logp.shape[-1] != logp.shape[-1]:
                    raise ConfigError(
                        f"--reference {reference}: vocabulary {ref_logp.shape[-1]} differs "
                        f"from the model's {logp.shape[-1]}"
                    )
                ref_nll_sum += -ref_logp.gather(1, targets[:, None]).sum().item()
                kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
                agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    nll = nll_sum / count
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=count,
        windows=windows.shape[0],
        seq_len=windows.shape[1],
        data=str(data),
        model=str(model),
        wall_s=round(time.perf_counter() - start, 3),
        peak_rss=peak_rss_bytes(),
        reference=str(reference) if reference is not None else None,
        reference_ppl=math.exp(ref_nll_sum / count) if ref is not None else None,
        kl=kl_sum / count if ref is not None else None,
        top1_agreement=agree / count if ref is not None else None,
    )


def check_token_range(lm, ids: torch.Tensor, what: str, vocab: int) -> None:
    """Refuse a model whose embedding has fewer rows than the token ids it would be fed (an
    IndexError deep in torch otherwise): the models must share the tokenizer."""
    rows = int(lm.get_input_embeddings().weight.shape[0])
    top = int(ids.max()) if ids.numel() else -1
    if top >= rows:
        raise ConfigError(
            f"{what}: its embedding has {rows} rows, but the tokenizer (vocabulary {vocab}) "
            f"gives token id {top}; evaluate models that share the tokenizer"
        )


def _log_probs(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities for every position but the last: ``(tokens, vocab)``."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    return F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
