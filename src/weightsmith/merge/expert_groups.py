"""Merge groups: the per-expert Linears that mergekit 0.1.5 merges as one fused tensor.

mergekit 0.1.5 reads a checkpoint saved with one Linear per expert through transformers'
conversion mapping, which stacks the experts along dim 0 and concatenates each expert's
listed Linears along dim 1 (``mlp.experts.gate_up_proj`` = [gate_e; up_e] for every e, shape
(experts, 2·I, H); ``mlp.experts.down_proj`` (experts, H, I)). A method whose result for an
entry depends on other entries of the tensor (``tensor_statistics``: TIES' top-k, SLERP's
angle, ...) therefore sees the whole fused tensor there. The architecture description names
these tensors (``merge_groups``); here the jobs of one group become one job whose inputs are
read member after member: flat, that concatenation IS the fused tensor (each member is a
contiguous (out, in) block), and its output is cut back into the members, so the checkpoint
keeps its per-expert layout. Memory: one layer's group per model at most.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from weightsmith.io.reader import Checkpoint
from weightsmith.merge.methods.base import MergeMethod
from weightsmith.merge.plan import TensorJob

__all__ = ["group_expert_jobs"]


def group_expert_jobs(
    jobs: list[TensorJob], ckpts: Mapping[str, Checkpoint], method: MergeMethod | None
) -> list[TensorJob]:
    """``jobs`` with each complete merge group replaced by one group job (at its first
    member's place); unchanged for element-wise methods and architectures without groups."""
    if method is None or not method.tensor_statistics:
        return jobs
    groups: dict[str, list[tuple[int, int, TensorJob]]] = {}
    order: list[TensorJob | str] = []
    for job in jobs:
        hit = _group_of(job, ckpts)
        if hit is None:
            order.append(job)
            continue
        key, expert, position = hit
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append((expert, position, job))
    out = []
    for item in order:
        if isinstance(item, TensorJob):
            out.append(item)
            continue
        members = [j for _, _, j in sorted(groups[item], key=lambda m: (m[0], m[1]))]
        grouped = _group_job(item, members, ckpts)
        out.extend([grouped] if grouped is not None else members)
    return out


def _group_of(job: TensorJob, ckpts: Mapping[str, Checkpoint]) -> tuple[str, int, int] | None:
    """``(output fused name, expert, position)`` when ``job`` is a merged member of a group."""
    if job.params is None or job.vocab or job.members:
        return None
    arch = ckpts[job.inputs[0][0]].arch
    prefix = arch.layer_prefix(job.out_name)
    if arch.experts is None or prefix is None:
        return None
    hit = arch.experts.merge_group(job.out_name[len(prefix) :])
    return None if hit is None else (prefix + hit[0], hit[1], hit[2])


def _group_job(
    name: str, members: list[TensorJob], ckpts: Mapping[str, Checkpoint]
) -> TensorJob | None:
    """One job for a group's ``members`` (sorted: expert, then Linear), or None when they do
    not make a fused tensor (an expert or a Linear missing, shapes or dtypes that differ, or
    parameters that differ): those members are then merged one by one, as before."""
    first = members[0]
    params = [replace(m.params, name="") for m in members if m.params is not None]
    if any(p != params[0] for p in params) or any(len(m.shape) != 2 for m in members):
        return None
    arch = ckpts[first.inputs[0][0]].arch
    prefix = arch.layer_prefix(first.out_name) or ""
    layout = arch.experts
    assert layout is not None
    linears = dict(layout.fused)[name[len(prefix) :]]
    experts = len(members) // len(linears)
    if experts * len(linears) != len(members):
        return None
    for k, m in enumerate(members):
        hit = layout.merge_group(m.out_name[len(prefix) :])
        if hit is None or hit[1:] != (k // len(linears), k % len(linears)):
            return None
        if m.shape != members[k % len(linears)].shape or m.shape[1] != first.shape[1]:
            return None
    dtypes = {tuple(ckpts[p].info(n).torch_dtype for p, n in m.inputs) for m in members}
    if len(dtypes) != 1:
        return None
    rows = sum(m.shape[0] for m in members[: len(linears)])
    return replace(
        first,
        key=name,
        names=(name,),
        shape=(experts, rows, first.shape[1]),
        params=replace(first.params, name=name),
        members=tuple(members),
    )
