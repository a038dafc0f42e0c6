"""``merge run --device cuda`` gives the CPU result for every method (the CPU runs the native
kernels, CUDA the torch code: two implementations checked against each other).

Tolerances. float32 outputs: within 2e-6 absolute (weights ~0.02; the devices differ only in
the order of float32 reductions, ~1e-7 relative). bfloat16 arithmetic (mergekit's semantics
for bfloat16 inputs): within two bfloat16 steps (a float32 intermediate that differs in its last
bits can round either way, twice). Methods that select entries (``SELECTING``) may flip a few
choices: in float32 where an importance lands within rounding of the threshold (at most 0.1 %
of entries), in bfloat16 also where |δ| ties exactly at the k-th value — bfloat16 has 256
mantissas per octave, so ties are common — and the device's sort orders tied entries its own
way, as mergekit's argsort does (at most 2 %). Karcher's fixed-point iteration in bfloat16
carries each step's rounding into the next (and may stop one iteration earlier or later): up
to 5 % of entries beyond two steps, the outputs within 5e-3 relative L2 (measured on an H200:
3 % and ~2e-3). DELLA in bfloat16 draws the native kernel's SplitMix64 per entry on
every device (``merge/methods/della.py``; before 2026-12-04 the torch path drew from torch's
generator and its masks differed, as measured on the H200), so it is held to the selecting
methods' bound; that has not yet been run on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.cuda.cuda_testlib import OTHER, on_both, run
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model

SELECTING = {"arcee_fusion", "breadcrumbs_ties", "della", "sce", "ties", "dare_ties", "ram"}
FLIPS = {torch.float32: 1e-3, torch.bfloat16: 0.02}  # selections a method may flip (docstring)
STEPS = 2  # bfloat16 steps of arithmetic difference allowed
ITERATIVE = {"karcher"}  # bfloat16 fixed-point iterations: see the docstring


def _w(name: str, weight: float, **more: float) -> dict:
    return {"model": name, "parameters": {"weight": weight, **more}}


FT = [{"model": "ft1"}, {"model": "ft2"}, {"model": "ft3"}]
RECIPES = {
    "linear": {"merge_method": "linear", "models": [_w("ft1", 0.3), _w("ft2", 0.6)]},
    "slerp": {"merge_method": "slerp", "base_model": "base",
              "models": [{"model": "base"}, {"model": "ft1"}], "parameters": {"t": [0, 0.3, 1]}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base",
                        "models": [_w("ft1", 0.7), _w("ft2", 0.45)], "parameters": {"lambda": 1.3}},
    "ties": {"merge_method": "ties", "base_model": "base",
             "models": [_w("ft1", 0.7, density=0.3), _w("ft2", 0.5, density=0.6)]},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "base",
                  "models": [_w("ft1", 0.7, density=0.5), _w("ft2", 0.5, density=0.6)]},
    "dare_linear": {"merge_method": "dare_linear", "base_model": "base",
                    "models": [_w("ft1", 0.7, density=0.5), _w("ft2", 0.5, density=0.6)]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "base",
                         "models": [_w("ft1", 1.0, density=0.8, gamma=0.05),
                                    _w("ft2", 1.0, density=0.8, gamma=0.05)]},
    "della": {"merge_method": "della", "base_model": "base",
              "models": [_w("ft1", 1.0, density=0.5, epsilon=0.1),
                         _w("ft2", 0.6, density=0.6, epsilon=0.1)]},
    "sce": {"merge_method": "sce", "base_model": "base", "models": FT,
            "parameters": {"select_topk": 0.3}},
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": FT},
    "nuslerp": {"merge_method": "nuslerp", "models": [_w("ft1", 0.3), _w("ft2", 0.7)]},
    "multislerp": {"merge_method": "multislerp",
                   "models": [_w("ft1", 0.2), _w("ft2", 0.5), _w("ft3", 0.3)]},
    "karcher": {"merge_method": "karcher", "models": FT},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "base", "models": FT[:1]},
    "ram": {"merge_method": "ram", "base_model": "base", "models": FT[:2]},
    "nearswap": {"merge_method": "nearswap", "base_model": "base", "models": FT[:1],
                 "parameters": {"t": 0.01}},
}  # fmt: skip


def _perturbed(src, out, seed: int, dtype: torch.dtype):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(src.glob("*.safetensors")):
        state = load_file(shard)
        for n in sorted(state):
            noise = torch.randn(state[n].shape, generator=gen) * 0.01
            state[n] = (state[n].float() + noise).to(dtype)
        save_file(state, out / shard.name, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"cuda-merge-{request.param}")
    base = build_tiny_model(root / "base", "llama", seed=0, dtype=request.param)
    fts = {f"ft{i}": _perturbed(base, root / f"ft{i}", i, request.param) for i in (1, 2, 3)}
    return {"base": base, **fts}


def _recipe(tmp_path, name: str, models: dict) -> str:
    def absolute(x):
        if isinstance(x, dict):
            return {k: str(models[v]) if k in ("model", "base_model") else absolute(v)
                    for k, v in x.items()}  # fmt: skip
        return [absolute(v) for v in x] if isinstance(x, list) else x

    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(yaml.safe_dump(absolute(RECIPES[name])))
    return str(cfg)


def _tensors(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {n: ck.get_tensor(n) for n in ck.tensors}


def _differences(cpu: dict, gpu: dict) -> tuple[int, int, int, float]:
    """(entries beyond the tolerance, entries that differ at all, entries, max |Δ|) where the
    tolerance is 2e-6 for float32 and ``STEPS`` bfloat16 steps for bfloat16 outputs."""
    beyond = differ = total = 0
    worst = 0.0
    for n in sorted(cpu):
        a, b = cpu[n], gpu[n]
        assert a.dtype == b.dtype and a.shape == b.shape, n
        diff = (a.float() - b.float()).abs()
        if a.dtype == torch.float32:
            tol = torch.full_like(diff, 2e-6)
        else:
            tol = STEPS * torch.finfo(torch.bfloat16).eps * a.float().abs() * 1.0001
        beyond += int((diff > tol).sum())
        differ += int((diff > 0).sum())
        total += a.numel()
        worst = max(worst, float(diff.max()))
    return beyond, differ, total, worst


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cuda_merge_gives_the_cpu_result(name, models, tmp_path):
    cfg = _recipe(tmp_path, name, models)
    outs = on_both(tmp_path, "merge", "run", cfg)
    cpu, gpu = _tensors(outs["cpu"]), _tensors(outs["other"])
    assert set(cpu) == set(gpu)
    dtype = next(iter(cpu.values())).dtype
    beyond, differ, total, worst = _differences(cpu, gpu)
    print(f"MERGE {name} {dtype}: beyond tolerance {beyond}, differing {differ} of {total}, "
          f"max |Δ| {worst:.3g}")  # fmt: skip
    allowed = FLIPS[dtype] * total if name in SELECTING else 0
    if name in ITERATIVE and dtype == torch.bfloat16:
        allowed = 0.05 * total
        num = sum(float((cpu[n].double() - gpu[n].double()).norm() ** 2) for n in cpu)
        den = sum(float(cpu[n].double().norm() ** 2) for n in cpu)
        assert (num / den) ** 0.5 <= 5e-3, f"{name}: relative L2 {(num / den) ** 0.5:.3g}"
    assert beyond <= allowed, f"{name}: {beyond} of {total} entries beyond the tolerance"


def test_arcee_fusion_samples_the_same_entries_on_cuda():
    from weightsmith.merge.methods.arcee_fusion import fusion_threshold

    gen = torch.Generator().manual_seed(0)
    imp = torch.rand(1_500_000, generator=gen)  # over the 1M sample: the quantiles are sampled
    cpu = fusion_threshold(imp, "model.layers.0.mlp.up_proj.weight")
    gpu = fusion_threshold(imp.to(OTHER), "model.layers.0.mlp.up_proj.weight")
    assert float(cpu) == pytest.approx(float(gpu.cpu()), rel=1e-6)


def test_extract_lora_on_cuda_folds_back_to_the_cpu_result(models, tmp_path):
    """The SVDs run on the device: the factors may differ in sign, their products may not.
    Folded back into the base (on the CPU), the two adapters give the same weights within
    1e-5 (rank-4 truncations of deltas whose singular values are distinct). With bfloat16
    models the factors are stored in bfloat16, so the folds agree to the factors' rounding
    (2^-7 of the delta) plus one step of the folded weight."""
    outs = on_both(tmp_path, "merge", "extract-lora", models["base"], models["ft1"], "--rank", "4")
    folded = {}
    for side, adapter in outs.items():
        folded[side] = tmp_path / f"folded-{side}"
        run("merge", "lora", models["base"], adapter, "-o", folded[side])
    cpu, gpu, base = _tensors(folded["cpu"]), _tensors(folded["other"]), _tensors(models["base"])
    for n in cpu:
        if cpu[n].dtype == torch.float32:
            torch.testing.assert_close(gpu[n], cpu[n], rtol=0, atol=1e-5, msg=n)
            continue
        # bfloat16 factors: each rounded to 2^-8 relative, so their product to ~2^-7 of the
        # delta's scale; the folded weight then rounds once more (one step of the weight)
        delta = float((cpu[n].float() - base[n].float()).abs().max())
        torch.testing.assert_close(gpu[n].float(), cpu[n].float(), rtol=2**-7,
                                   atol=2**-7 * delta + 1e-6, msg=n)  # fmt: skip
