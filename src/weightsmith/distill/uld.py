"""Cross-tokenizer logit distillation: ULD (Boizard et al. 2024, arXiv:2402.12030) over
text-aligned positions (the span alignment of TRL's GOLD trainer, ``use_extended_uld``).

The teacher and the student each read the same raw text tokenized by their own tokenizer; the
teacher's logits come from its own tokens. Positions are paired by text, not by index:

1. **alignment** (:func:`align_spans`): walk both token sequences by the character offset where
   each token ends, advancing the side that ends earlier; a *group* closes where both tokenizers
   end a token at the same character. A group is one or more consecutive tokens on each side
   covering the same text. (The paper instead truncates both sequences to the shorter length and
   pairs positions by index, which pairs unrelated text as soon as the tokenizers split words
   differently; we align by text.) Groups holding a token that is not predicted (the first token
   of a window, a prompt token, a zero-width BOS) are dropped, and so is an unclosed remainder
   (a trailing EOS on one side only, like GOLD's ``uld_skip_*_eos``).
2. **merging** (:func:`merged_logprobs`, GOLD's ``"observed"`` strategy): a group of tokens
   ``j..k`` is scored by the full distribution predicting token ``j`` times the probabilities
   of the actual later tokens ``j+1..k``, ``p(· | <j) · Π_{m=j+1..k} p(x_m | <m)``: exact for
   the realised text by the chain rule, unnormalised for the others.
3. **distance**: :func:`weightsmith.distill.losses.uld_distance` between the two merged
   distributions (sorted decreasingly, the narrower padded with zeros, L1), one term per group.

The step's objective is the kd one with this distance as the divergence::

    loss = [ α · Σ_t CE_t  +  (1 − α) · τ² · Σ_g ULD_g ] / N

CE over the student's completion positions t on its own tokens, ULD over aligned groups g, both
at softmax temperature τ (CE at τ = 1), N the completion positions of the optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from weightsmith.core.training.data import Example, Records, collate
from weightsmith.core.training.engine import StepOutput
from weightsmith.core.training.losses import IGNORE_INDEX, completion_ce, shift_for_next_token
from weightsmith.core.training.tasks import TokenTask
from weightsmith.distill.losses import LossConfig, uld_distance
from weightsmith.errors import ConfigError

Span = tuple[int, int]  # a token's [start, end) characters in the shared text
Group = tuple[int, int, int, int]  # (student first, student last, teacher first, teacher last)
GroupDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def align_spans(s_spans: list[Span], t_spans: list[Span]) -> list[Group]:
    """Groups of consecutive tokens covering the same text: inclusive token index ranges
    ``(s_first, s_last, t_first, t_last)``, closed where both sides end a token at the same
    character. A trailing remainder that never closes is dropped."""
    groups: list[Group] = []
    s = t = s0 = t0 = 0
    while s < len(s_spans) and t < len(t_spans):
        s_end, t_end = s_spans[s][1], t_spans[t][1]
        if s_end < t_end:
            s += 1
        elif s_end > t_end:
            t += 1
        else:
            groups.append((s0, s, t0, t))
            s += 1
            t += 1
            s0, t0 = s, t
    return groups


def trainable_groups(
    groups: list[Group], s_labels: tuple[int, ...], t_first: int, t_len: int
) -> list[Group]:
    """The groups whose every token is predicted: student tokens from index 1 with a label
    (not prompt), teacher tokens in ``[max(t_first, 1), t_len)``."""
    keep = []
    for g in groups:
        s_ok = g[0] >= 1 and all(s_labels[i] != IGNORE_INDEX for i in range(g[0], g[1] + 1))
        if s_ok and g[2] >= max(t_first, 1) and g[3] < t_len:
            keep.append(g)
    return keep


@dataclass(frozen=True)
class CrossExample:
    """A student example, the teacher's own tokens of the same text, and their aligned groups."""

    student: Example
    teacher_ids: tuple[int, ...]
    groups: tuple[Group, ...]


def _encode(tok, text: str, special: bool) -> tuple[list[int], list[Span]]:
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def check_fast(tok, who: str) -> None:
    """Alignment reads character offsets, which only fast (Rust) tokenizers give."""
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"--loss uld|gold across tokenizers needs a fast tokenizer for the {who} "
                          f"(character offsets); {type(tok).__name__} has none")  # fmt: skip


def cross_examples(records: Records, s_tok, t_tok, seq_len: int) -> list[CrossExample]:
    """The student's examples exactly as :func:`~weightsmith.core.training.data.tokenize_records`
    cuts them (windows of ``seq_len`` tokens; prompt/completion pairs truncated to ``seq_len``),
    each with the teacher's tokens of the same characters and the aligned groups."""
    check_fast(s_tok, "student")
    check_fast(t_tok, "teacher")
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2, got {seq_len}")
    out: list[CrossExample] = []
    for text in records.texts:
        ids, spans = _encode(s_tok, text, True)
        for start in range(0, len(ids), seq_len):
            window, w_spans = ids[start : start + seq_len], spans[start : start + seq_len]
            if len(window) >= 2:
                out.append(_window_example(text, tuple(window), w_spans, t_tok))
    for prompt, completion in records.pairs:
        out.append(_pair_example(prompt, completion, s_tok, t_tok, seq_len))
    out = [x for x in out if any(v != IGNORE_INDEX for v in x.student.labels[1:])]
    if not out:
        raise ConfigError("the data holds no example with a completion token inside --seq-len")
    return out


def _window_example(text: str, ids: tuple[int, ...], spans: list[Span], t_tok) -> CrossExample:
    lo = min(a for a, b in spans if b > a) if any(b > a for a, b in spans) else 0
    hi = max(b for _, b in spans)
    t_ids, t_spans = _encode(t_tok, text[lo:hi], True)
    t_spans = [(a + lo, b + lo) for a, b in t_spans]
    groups = trainable_groups(align_spans(spans, t_spans), ids, 1, len(t_ids))
    return CrossExample(Example(ids, ids), tuple(t_ids), tuple(groups))


def _pair_example(prompt: str, completion: str, s_tok, t_tok, seq_len: int) -> CrossExample:
    """Prompt and completion tokenized separately on both sides (as tokenize_records does), in
    one character frame: the prompt at [0, P), the completion from P, EOS zero-width at the end."""
    sides = []
    for tok in (s_tok, t_tok):
        p_ids, p_spans = _encode(tok, prompt, True)
        c_ids, c_spans = _encode(tok, completion, False)
        c_spans = [(a + len(prompt), b + len(prompt)) for a, b in c_spans]
        if tok.eos_token_id is not None:
            c_ids, c_spans = [*c_ids, tok.eos_token_id], [*c_spans, (len(prompt + completion),) * 2]
        sides.append((p_ids + c_ids, p_spans + c_spans, len(p_ids)))
    (s_ids, s_spans, s_p), (t_ids, t_spans, t_p) = sides
    s_ids, s_spans = s_ids[:seq_len], s_spans[:seq_len]
    labels = tuple([IGNORE_INDEX] * s_p + s_ids[s_p:])[:seq_len]
    end = max((b for _, b in s_spans), default=0)  # the teacher reads no further than the student
    t_keep = sum(1 for _, b in t_spans if b <= end)
    t_ids, t_spans = t_ids[:t_keep], t_spans[:t_keep]
    groups = trainable_groups(align_spans(s_spans, t_spans), labels, t_p, len(t_ids))
    return CrossExample(Example(tuple(s_ids), labels), tuple(t_ids), tuple(groups))


def merged_logprobs(
    logp: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """log of each group's merged distribution (GOLD's "observed" strategy).

    ``logp`` (B, T-1, V): shifted log-probabilities (row r predicts token r+1); ``targets``
    (B, T-1): the tokens they predict (any value where unused); ``groups`` (G, 3): batch row,
    first and last *token* index of each group. Returns (G, V):
    ``logp[b, first-1] + Σ_{r=first}^{last-1} logp[b, r, targets[b, r]]``.
    """
    tok = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    csum = F.pad(tok.cumsum(-1), (1, 0))  # csum[:, r] = Σ_{r' < r} tok[:, r']
    b, first, last = groups.unbind(-1)
    cont = csum[b, last] - csum[b, first]
    return logp[b, first - 1] + cont.unsqueeze(-1)


def uld_groups_sum(
    s_logits: torch.Tensor,
    s_targets: torch.Tensor,
    t_logits: torch.Tensor,
    t_targets: torch.Tensor,
    groups: torch.Tensor,
    temperature: float = 1.0,
    distance: GroupDistance | None = None,
) -> torch.Tensor:
    """Σ over aligned groups of a distance between the merged distributions at τ.

    ``s_logits``/``t_logits``: shifted (B, T_S-1, V_S) and (B, T_T-1, V_T), each predicting
    ``*_targets``; ``groups`` (G, 5): batch row, student first/last, teacher first/last token.
    ``distance(student_logp, teacher_logp) -> (G,)`` on the merged log-probabilities; default
    the ULD distance of their probabilities (``--loss gold`` passes its hybrid).
    """
    if groups.numel() == 0:
        return s_logits.sum() * 0.0
    s_logp = F.log_softmax(s_logits.float() / temperature, dim=-1)
    t_logp = F.log_softmax(t_logits.float() / temperature, dim=-1)
    s = merged_logprobs(s_logp, s_targets, groups[:, [0, 1, 2]])
    t = merged_logprobs(t_logp, t_targets, groups[:, [0, 3, 4]])
    if distance is None:
        return uld_distance(s.exp(), t.exp()).sum()
    return distance(s, t).sum()


def collate_cross(examples: list[CrossExample], s_pad: int, t_pad: int) -> dict:
    """The student batch (as :func:`collate`), the teacher's ids/mask and the groups (G, 5)."""
    batch = collate([x.student for x in examples], s_pad)
    teacher = collate([Example(x.teacher_ids, x.teacher_ids) for x in examples], t_pad)
    rows = [(i, *g) for i, x in enumerate(examples) for g in x.groups]
    batch["teacher_input_ids"] = teacher["input_ids"]
    batch["teacher_attention_mask"] = teacher["attention_mask"]
    batch["groups"] = torch.tensor(rows, dtype=torch.long).reshape(-1, 5)
    return batch


class UldTask(TokenTask):
    """kd across tokenizers: α·CE on the student's tokens + (1−α)·τ²·D over aligned groups,
    D the ULD distance or the one given (``--loss gold``)."""

    def __init__(self, model, examples: list[CrossExample], s_pad: int, teacher, t_pad: int,
                 loss: LossConfig, device: torch.device,
                 distance: GroupDistance | None = None) -> None:  # fmt: skip
        super().__init__(model, [x.student for x in examples], s_pad, device)
        self.cross, self.teacher, self.t_pad, self.loss_cfg = examples, teacher, t_pad, loss
        self.distance = distance

    def batch(self, indices: list[int]) -> dict:
        return collate_cross([self.cross[i] for i in indices], self.pad_id, self.t_pad)

    def step(self, batch: dict, indices: list[int], normaliser: int) -> StepOutput:
        cfg = self.loss_cfg
        ids, attn, logits, labels = self.forward(batch)
        _, _, ce_sum = completion_ce(logits, labels)
        t_ids = batch["teacher_input_ids"].to(self.device)
        with torch.no_grad():
            t_logits = self.teacher(
                input_ids=t_ids, attention_mask=batch["teacher_attention_mask"].to(self.device)
            ).logits
        groups = batch["groups"].to(self.device)
        div_sum = uld_groups_sum(logits, ids[:, 1:], *shift_for_next_token(t_logits, t_ids),
                                 groups, cfg.temperature, self.distance)  # fmt: skip
        total = cfg.alpha * ce_sum + (1.0 - cfg.alpha) * cfg.temperature**2 * div_sum
        metrics = {cfg.loss: float(div_sum.detach()) / max(len(groups), 1)}
        return StepOutput(total / max(normaliser, 1), int(attn.sum()), metrics)
