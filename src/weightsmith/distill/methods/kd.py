"""Logit distillation (``kd``), sequence-level KD (``seqkd``) and SFT on prompt/completion pairs.

All three train a causal-LM student on token examples with
``[α·Σ CE + (1−α)·τ²·Σ D] / N`` (:func:`weightsmith.distill.losses.distillation_loss`); they
differ in where the completions and the teacher signal come from: ``kd`` compares logits with a
teacher loaded online or a top-k cache, ``seqkd`` has the teacher write the completions first
(α = 1 then), ``sft`` trains on the completions in the data (α = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import weightsmith.distill.methods.base as base
from weightsmith.core.device import select_device
from weightsmith.core.models import load_model, load_tokenizer, logits_width
from weightsmith.core.training import StepOutput, train
from weightsmith.core.training.data import (
    Example,
    Records,
    collate,
    data_fingerprint,
    read_records,
    tokenize_records,
)
from weightsmith.core.training.distributed import (
    ProcessGroup,
    all_reduce_sum,
    barrier,
    init_process_group,
)
from weightsmith.core.training.losses import (
    IGNORE_INDEX,
    kl_divergence,
    shift_for_next_token,
)
from weightsmith.core.training.tasks import TokenTask
from weightsmith.distill.cache import TeacherCache
from weightsmith.distill.config import DistillConfig
from weightsmith.distill.fsdp import plan_fsdp
from weightsmith.distill.gkd import OnPolicyMix, RolloutSettings
from weightsmith.distill.gold import GoldSettings, build_vocab_map
from weightsmith.distill.hidden import HiddenProjector, check_layer_pairs, hidden_state_loss
from weightsmith.distill.losses import distillation_loss, gold_distance
from weightsmith.distill.methods.base import DistillResult, DistillRun, distill_method
from weightsmith.distill.seqkd import generate_pairs, prompts_of
from weightsmith.distill.uld import UldTask, cross_examples
from weightsmith.distill.vocab import plan_vocab, tokenizer_hash
from weightsmith.errors import ConfigError
from weightsmith.io.reader import open_checkpoint

CROSS_LOSSES = ("uld", "gold")  # the divergences that work across tokenizers


@distill_method("kd", inputs=("teacher", "teacher_cache", "eval_data"),
                options=("loss", "lmbda", "hidden"), multi_process=True)  # fmt: skip
def train_kd(run: DistillRun) -> DistillResult:
    """Match the teacher's next-token distribution (online or from a top-k cache) plus α·CE."""
    if run.cfg.lmbda > 0:
        if run.teacher is None or run.teacher_cache is not None:
            raise ConfigError("--lmbda > 0 (on-policy GKD) needs an online --teacher: it scores "
                              "the student's own samples, which no --teacher-cache holds")  # fmt: skip
        if run.cfg.loss.alpha >= 1.0:
            raise ConfigError("--lmbda > 0 trains on the teacher's logits over the student's "
                              "samples: give --alpha < 1")  # fmt: skip
    if run.cfg.hidden is not None:
        _check_hidden(run)
    if run.cfg.loss.loss in CROSS_LOSSES:
        _check_uld(run)
    if run.cfg.loss.alpha < 1.0 and run.teacher is None and run.teacher_cache is None:
        raise ConfigError("give --teacher or --teacher-cache (or --alpha 1 for CE only)")
    return _train_lm(run, run.cfg, seqkd=False)


def _check_hidden(run: DistillRun) -> None:
    """Hidden-state KD needs the teacher online, and layer pairs inside both models."""
    if run.teacher is None or run.teacher_cache is not None:
        raise ConfigError("--hidden-layers needs an online --teacher (a --teacher-cache holds "
                          "no hidden states)")  # fmt: skip
    layers = []
    for path in (run.student, run.teacher):
        with open_checkpoint(path) as c:
            layers.append(int((c.config or {}).get("num_hidden_layers", c.num_layers)))
    check_layer_pairs(run.cfg.hidden.pairs, *layers)


def _check_uld(run: DistillRun) -> None:
    """ULD and GOLD read the teacher's logits on its own tokens: an online teacher, off-policy
    data."""
    name = run.cfg.loss.loss
    if run.teacher_cache is not None:
        raise ConfigError(f"--loss {name} needs an online --teacher: a --teacher-cache holds the "
                          "teacher's top-k on the student's tokens, not on its own")  # fmt: skip
    if run.cfg.lmbda > 0:
        raise ConfigError(f"--loss {name} does not combine with --lmbda (on-policy samples are "
                          "student tokens, which the teacher would have to re-tokenize)")  # fmt: skip
    if run.cfg.hidden is not None:
        raise ConfigError(f"--loss {name} does not combine with --hidden-layers (the positions "
                          "of two tokenizers do not line up one to one)")  # fmt: skip


def _cross_tokenizer(run: DistillRun, cfg: DistillConfig, s_tok):
    """The teacher's tokenizer when this kd run distils across vocabularies (--loss uld|gold
    with different tokenizers), else None (same tokenizers: the plain per-position path)."""
    if cfg.method != "kd" or cfg.loss.loss not in CROSS_LOSSES or cfg.loss.alpha >= 1.0:
        return None
    try:
        t_tok = load_tokenizer(run.teacher)
    except Exception as e:  # CheckpointError: no or unreadable tokenizer files
        raise ConfigError(f"--loss {cfg.loss.loss} tokenizes the text for the teacher, but "
                          f"teacher {run.teacher} has no usable tokenizer ({e})") from None  # fmt: skip
    if t_tok.get_vocab() != s_tok.get_vocab():
        return t_tok
    if cfg.gold not in (None, GoldSettings()):  # one vocabulary: gold is jsd, no map to tune
        raise ConfigError("teacher and student share one tokenizer: --loss gold is --loss jsd "
                          "there; the --gold-* options are for two tokenizers")  # fmt: skip
    return None


@distill_method("seqkd", inputs=("teacher", "eval_data"),
                options=("gen_max_new_tokens", "gen_temperature", "gen_prompt_tokens"),
                multi_process=True,
                refuse={"teacher_cache": "--method seqkd does not use --teacher-cache"})  # fmt: skip
def train_seqkd(run: DistillRun) -> DistillResult:
    """The teacher writes completions of the data's prompts; the student learns them by CE."""
    if run.teacher is None:
        raise ConfigError("--method seqkd needs --teacher (it generates the completions)")
    return _train_lm(run, run.cfg, seqkd=True)


_SFT_NO_TEACHER = ("--method sft trains on the completions in --data; it takes no --teacher "
                   "(write them with distill generate)")  # fmt: skip


@distill_method("sft", inputs=("eval_data",), multi_process=True,
                refuse={"teacher": _SFT_NO_TEACHER, "teacher_cache": _SFT_NO_TEACHER})  # fmt: skip
def train_sft(run: DistillRun) -> DistillResult:
    """Cross-entropy on the completions in --data (e.g. written by ``distill generate``)."""
    return _train_lm(run, replace(run.cfg, loss=replace(run.cfg.loss, alpha=1.0)), seqkd=False)


@dataclass
class _Teacher:
    """Where the teacher signal comes from in this run."""

    model: object | None = None
    cache: TeacherCache | None = None
    common: int | None = None  # logits compared over [..., :common]


class _KdTask(TokenTask):
    """Micro-batches of token examples and the distillation loss step."""

    def __init__(self, model, examples, pad_id, src: _Teacher, cfg: DistillConfig, dev,
                 mix: OnPolicyMix | None = None, eos_id: int | None = None,
                 projector: HiddenProjector | None = None) -> None:  # fmt: skip
        super().__init__(model, examples, pad_id, dev)
        self.src, self.cfg, self.mix, self.eos_id = src, cfg, mix, eos_id
        self.projector = projector  # with cfg.hidden: student -> teacher width, trained

    def batch(self, indices: list[int]) -> dict:
        if self.mix is None or not self.mix.draw():
            return super().batch(indices)
        rollouts = self.mix.rollouts(self.model, [self.examples[i] for i in indices],
                                     self.pad_id, self.eos_id)  # fmt: skip
        return {**collate(rollouts, self.pad_id), "on_policy": True}

    def step(self, batch: dict, indices: list[int], normaliser: int) -> StepOutput:
        if self.cfg.hidden is None:
            input_ids, attn, logits, labels = self.forward(batch)
        else:
            input_ids, attn, logits, labels, s_states = self._forward_states(batch)
        kwargs = self._teacher_signal(input_ids, attn, indices)
        t_states = kwargs.pop("hidden_states", None)
        if self.src.common is not None:
            logits = logits[..., : self.src.common]
        loss_cfg, scale = self.cfg.loss, 1.0
        if batch.get("on_policy"):  # no CE on the student's own samples: (1−α)·τ²·D only
            loss_cfg, scale = replace(loss_cfg, alpha=0.0), 1.0 - loss_cfg.alpha
        parts = distillation_loss(logits, labels, loss_cfg, normaliser, **kwargs)
        loss = parts.loss if scale == 1.0 else parts.loss * scale
        metrics = {} if self.mix is None else {"on_policy": float(bool(batch.get("on_policy")))}
        if self.cfg.hidden is not None:  # + W·Σ ℓ(proj(h_S), h_T) / N (distill.hidden)
            mask = labels != IGNORE_INDEX
            h_sum = hidden_state_loss(s_states, t_states, mask, self.cfg.hidden, self.projector)
            loss = loss + self.cfg.hidden.weight * h_sum / max(normaliser, 1)
            metrics["hidden"] = float(h_sum.detach()) / max(int(mask.sum()), 1)
        return StepOutput(loss, int(attn.sum()), metrics)

    def _forward_states(self, batch: dict) -> tuple:
        """:meth:`forward` plus the student's hidden states (embeddings, then every layer)."""
        ids = batch["input_ids"].to(self.device)
        attn = batch["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        logits, labels = shift_for_next_token(out.logits, batch["labels"].to(self.device))
        return ids, attn, logits, labels, out.hidden_states

    def _teacher_signal(self, input_ids, attn, indices: list[int]) -> dict:
        src = self.src
        if src.model is not None and self.cfg.hidden is not None:
            with torch.no_grad():
                out = src.model(input_ids=input_ids, attention_mask=attn, output_hidden_states=True)
            return {"teacher_logits": out.logits[:, :-1, : src.common],
                    "hidden_states": out.hidden_states}  # fmt: skip
        if src.model is not None:
            with torch.no_grad():
                t_logits = src.model(input_ids=input_ids, attention_mask=attn).logits
            return {"teacher_logits": t_logits[:, :-1, : src.common]}
        if src.cache is not None:
            ids, logp, tail = src.cache.rows(indices, input_ids.shape[1] - 1)
            if src.common is not None and int(ids.max()) >= src.common:
                raise ConfigError(
                    f"teacher cache top-k holds token ids >= the student's {src.common} logits"
                )
            return {
                "teacher_topk": (ids.to(self.device), logp.to(self.device), tail.to(self.device))
            }
        return {}


def _train_lm(run: DistillRun, cfg: DistillConfig, *, seqkd: bool) -> DistillResult:
    teacher, cache = run.teacher, run.teacher_cache
    dev = select_device(run.device)
    pg = init_process_group(dev.type)
    if pg.world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", pg.local_rank)
    if cfg.batch_size % pg.world:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must be divisible by the {pg.world} processes"
        )
    base.check_output(run, [teacher, run.student, cache])  # fail before training
    online = cfg.method == "kd" and cfg.loss.alpha < 1.0 and cache is None
    fs = plan_fsdp(run, cfg, pg, online_teacher=online and teacher is not None)
    notes: list[str] = []
    s_tok = load_tokenizer(run.student)
    records = read_records(run.data)
    t_tok = _cross_tokenizer(run, cfg, s_tok)  # set: ULD across tokenizers
    t_model = None
    if teacher is not None and (seqkd or cache is None):
        t_model = load_model(teacher, dev)
    if seqkd:
        records, cfg = _teacher_completions(run, cfg, records, t_model, pg, notes)
        t_model = None
    examples, cross = _token_examples(records, s_tok, t_tok, cfg, notes)
    student = base.load_student(run, dev)
    src = _Teacher()
    if cross is not None:
        src = _Teacher(model=t_model)
    elif cfg.method == "kd" and cfg.loss.alpha < 1.0:
        src = _teacher_source(run, cfg, records, s_tok, t_model, logits_width(student), notes)
    elif cfg.hidden is not None:
        src = _Teacher(model=t_model)  # hidden states only: the logits are not compared
    projector = None
    if cfg.hidden is not None:
        projector = HiddenProjector(len(cfg.hidden.pairs), student.config.hidden_size,
                                    t_model.config.hidden_size, cfg.seed).to(dev)  # fmt: skip
    student = base.add_lora(student, cfg)
    optimizer = None
    if fs is not None:  # FSDP2: shard the student (and online teacher), AdamW on the shards
        fs.shard(student, src.model)
        optimizer = fs.optimizer(student, base.loop_config(cfg))
    evaluate = None
    if run.eval_data is not None:
        held_out = tokenize_records(read_records(run.eval_data), s_tok, cfg.seq_len)

        kl_teacher = t_model if cross is None else None  # KL needs a shared vocabulary

        def evaluate() -> dict:
            return heldout_metrics(student, held_out, s_tok, cfg, dev, pg, kl_teacher)

    mix = None
    if cfg.lmbda > 0:
        mix = OnPolicyMix(cfg.lmbda, RolloutSettings(cfg.gen_max_new_tokens, cfg.gen_temperature,
                          cfg.gen_prompt_tokens, cfg.seq_len), cfg.seed, pg.rank)  # fmt: skip
    task = _KdTask(student, examples, s_tok.pad_token_id, src, cfg, dev, mix, s_tok.eos_token_id,
                   projector)  # fmt: skip
    if cross is not None:
        task = _cross_task(student, cross, s_tok, t_model, t_tok, cfg, dev, notes)
    tr = train(_trainable(student, projector), task, len(examples), base.loop_config(cfg), pg=pg, evaluate=evaluate,
               progress=run.progress, desc="distill", optimizer=optimizer,
               sharded=fs is not None)  # fmt: skip
    if mix is not None:
        notes.append(f"gkd: the student generated {mix.generated} of {mix.draws} micro-batches "
                     f"(lmbda {cfg.lmbda})")  # fmt: skip
    result = base.make_result(run, tr, tr.units, notes, pg.world)
    state = None
    if fs is not None:  # collective: every process reports, rank 0 gets the full weights
        result.fsdp = fs.report(student, optimizer, pg)
        state = fs.gather(student)
    if pg.main:
        base.save_student(run, student, cfg, records.fingerprint, s_tok, result, teacher=teacher,
                     teacher_cache=cache, state=state)  # fmt: skip
    barrier(pg.world)
    if src.cache is not None:
        src.cache.close()
    return base.finish(run, result)


def _trainable(student, projector):
    """What the optimizer trains: the student, with the hidden-state projection (not saved)."""
    if projector is None:
        return student
    return torch.nn.ModuleDict({"student": student, "projector": projector})


def _cross_task(student, cross, s_tok, t_model, t_tok, cfg: DistillConfig, dev, notes) -> UldTask:
    """The step across tokenizers: ULD, or GOLD's hybrid over the vocabulary map by text."""
    distance = None
    if cfg.loss.loss == "gold":
        gold = cfg.gold or GoldSettings()
        vmap = build_vocab_map(s_tok, t_tok, logits_width(t_model), gold.vocab_map)
        t2s = vmap.teacher_to_student.to(dev)
        notes.append(f"gold: {gold.vocab_map} map by text: {vmap.matched_teacher} of "
                     f"{len(t_tok)} teacher tokens onto {vmap.shared_student} of {len(s_tok)} "
                     "student tokens")  # fmt: skip

        def distance(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
            return gold_distance(s_logp, t_logp, t2s, cfg.loss.beta, gold.matched_weight,
                                 gold.unmatched_weight)  # fmt: skip

    return UldTask(student, cross, s_tok.pad_token_id, t_model, t_tok.pad_token_id, cfg.loss, dev,
                   distance)  # fmt: skip


def _token_examples(records: Records, s_tok, t_tok, cfg: DistillConfig, notes: list[str]):
    """The student's examples, and with a teacher tokenizer (ULD/GOLD across tokenizers) the same
    examples paired with the teacher's tokens and their text-aligned groups."""
    if t_tok is None:
        return tokenize_records(records, s_tok, cfg.seq_len), None
    cross = cross_examples(records, s_tok, t_tok, cfg.seq_len)
    positions = sum(len(x.student.input_ids) - 1 for x in cross)
    notes.append(f"{cfg.loss.loss}: teacher and student tokenizers differ ({len(t_tok)} vs "
                 f"{len(s_tok)} tokens); {sum(len(x.groups) for x in cross)} text-aligned "
                 f"groups over {positions} student positions")  # fmt: skip
    return [x.student for x in cross], cross


def _teacher_completions(run: DistillRun, cfg, records: Records, t_model, pg, notes):
    """seqkd: the teacher's completions of the data's prompts become the training pairs."""
    t_tok = load_tokenizer(run.teacher)
    prompts = prompts_of(records, t_tok, cfg)
    pairs = generate_pairs(t_model, t_tok, prompts, cfg, rank=pg.rank, world=pg.world,
                           progress=run.progress)  # fmt: skip
    notes.append(f"seqkd: teacher generated {len(pairs)} completions")
    return Records([], pairs, records.fingerprint), replace(cfg, loss=replace(cfg.loss, alpha=1.0))


def _teacher_source(run: DistillRun, cfg, records, s_tok, t_model, s_width, notes) -> _Teacher:
    """The teacher signal of a kd run: its top-k cache (checked) or the loaded teacher."""
    src = _Teacher()
    if run.teacher_cache is not None:
        src.cache = TeacherCache(run.teacher_cache)
        t_fp = None
        if run.teacher is not None:
            with open_checkpoint(run.teacher) as c:
                t_fp = c.fingerprint()
        s_hash = tokenizer_hash(s_tok)
        src.cache.check(
            data_fingerprint=data_fingerprint(records, s_hash, cfg.seq_len),
            tokenizer_hash=s_hash,
            temperature=cfg.loss.temperature,
            teacher_fingerprint=t_fp,
        )
        src.common = min(int(src.cache.meta["vocab_length"]), s_width)
        return src
    src.model = t_model
    plan = plan_vocab(
        load_tokenizer(run.teacher), s_tok, logits_width(t_model), s_width,
        where=(f"teacher {run.teacher}", f"student {run.student}"),
    )  # fmt: skip
    src.common = plan.common
    if plan.note:
        notes.append(plan.note)
    return src


@torch.no_grad()
def heldout_metrics(
    model, examples: list[Example], tok, cfg: DistillConfig, dev, pg: ProcessGroup, teacher=None
) -> dict:
    """Held-out CE per completion token, perplexity, and KL(teacher ‖ student) at τ = 1."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # ce, kl, tokens
    mine = examples[pg.rank :: pg.world]
    for b in range(0, len(mine), cfg.batch_size):
        batch = collate(mine[b : b + cfg.batch_size], tok.pad_token_id)
        ids, attn = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        logits, labels = shift_for_next_token(
            model(input_ids=ids, attention_mask=attn).logits.float(), batch["labels"].to(dev)
        )
        mask = labels != IGNORE_INDEX
        sums[0] += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        sums[2] += int(mask.sum())
        if teacher is not None:
            t_logits = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            width = min(t_logits.shape[-1], logits.shape[-1])
            kl = kl_divergence(
                F.log_softmax(t_logits[mask][:, :width], -1),
                F.log_softmax(logits[mask][:, :width], -1),
            )
            sums[1] += float(kl.sum())
    all_reduce_sum(sums, pg.world)
    model.train(was_training)
    n = max(float(sums[2]), 1.0)
    out = {"tokens": int(sums[2]), "ce": float(sums[0]) / n, "ppl": math.exp(float(sums[0]) / n)}
    if teacher is not None:
        out["kl_to_teacher"] = float(sums[1]) / n
    return out
