"""``gate_mode: hidden`` router rows from layer-streamed hidden states of the prompts.

mergekit-moe 0.1.5 runs the whole base model on each expert's (BOS +) prompts, left-padded in
one batch, and takes every decoder layer's *input* hidden state at the last token, averaged
over the prompts; minus the same for the negative prompts; normalised per layer. Here the base
model runs one decoder layer at a time (:class:`~weightsmith.core.calibration.LayerStreamer`),
prompts of equal length batched together without padding: the same values (padding is masked
and rotary attention depends on relative positions only), in float32 where mergekit loads
bfloat16. ``hidden_avg`` (mean over the sequence, padding included in mergekit) is refused.
"""

from __future__ import annotations

import torch

from weightsmith.core.calibration import LayerStreamer
from weightsmith.io.reader import Checkpoint


def last_token_states(
    ck: Checkpoint, tokenizer, prompts: list[str], *, progress: bool = False
) -> dict[str, torch.Tensor]:
    """prompt -> (layers, hidden) float32: each decoder layer's input at the prompt's last
    token, one decoder layer in memory at a time."""
    ids = {
        p: tokenizer((tokenizer.bos_token or "") + p, add_special_tokens=False).input_ids
        for p in prompts
    }
    by_length: dict[int, list[str]] = {}
    for p, t in ids.items():
        by_length.setdefault(len(t), []).append(p)
    out: dict[str, torch.Tensor] = {}
    for group in by_length.values():
        streamer = LayerStreamer(ck, torch.tensor([ids[p] for p in group]), progress=progress)
        rows = []
        for i in streamer.layers():
            rows.append(streamer.hidden_states()[:, -1, :].float().clone())
            streamer.run_layer(i, lambda _layer: None)
        states = torch.stack(rows, dim=1)  # (prompts, layers, hidden)
        out.update({p: states[k] for k, p in enumerate(group)})
    return out


def hidden_gates(ck: Checkpoint, tokenizer, experts, *, progress: bool = False) -> torch.Tensor:
    """(layers, experts, hidden): mergekit's ``hidden`` router rows."""
    prompts = list(
        dict.fromkeys(p for e in experts for p in (*e.positive_prompts, *e.negative_prompts))
    )
    states = last_token_states(ck, tokenizer, prompts, progress=progress)

    def mean(ps) -> torch.Tensor:
        return torch.stack([states[p] for p in ps]).sum(dim=0) / len(ps)

    rows = []
    for e in experts:
        v = mean(e.positive_prompts)
        if e.negative_prompts:
            v = v - mean(e.negative_prompts)
        rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)
