"""The next tensor's statistics computed beside this one's output (merge/engine.Lookahead,
core/parallel.beside): the same bytes as one tensor at a time, errors in order, nothing kept."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import yaml
from merge_testlib import assert_one_line_error, poke, run_cli

import weightsmith.io.reader as reader
import weightsmith.kernels as kernels
from weightsmith.core.parallel import beside, compute_pool, pmap, pool_workers
from weightsmith.errors import CheckpointError
from weightsmith.merge.lookahead import Lookahead

pytestmark = pytest.mark.skipif(kernels.merge_kernels() is None, reason="no C compiler here")

BF16 = torch.bfloat16
RECIPES = {
    "nuslerp": {"models": [{"weight": 0.3}, {"weight": 0.7}], "base": True},
    "model_stock": {"models": [{}, {}], "base": True},
    "multislerp": {"models": [{"weight": 1.0}, {"weight": 2.0}], "base": True},
    "slerp": {"models": [{}], "base": True, "parameters": {"t": 0.4}},
    "arcee_fusion": {"models": [{}], "base": True},
}


def recipe(method: str, base: Path, models: list[Path], tmp: Path) -> Path:
    spec = RECIPES[method]
    body: dict = {"merge_method": method, "dtype": "bfloat16", "base_model": str(base)}
    body["models"] = [
        {"model": str(m), **({"parameters": p} if p else {})}
        for m, p in zip(models, spec["models"], strict=False)
    ]
    if "parameters" in spec:
        body["parameters"] = spec["parameters"]
    path = tmp / f"{method}.yml"
    path.write_text(yaml.safe_dump(body))
    return path


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.fixture
def bf16_trio(tiny_model):
    return [tiny_model("llama", s, BF16) for s in (0, 1, 2)]


@pytest.fixture
def counted(monkeypatch):
    """How many jobs took a stream made ahead (so a passing comparison is not vacuous)."""
    hits = []
    take = Lookahead.take

    def counting(self, job):
        stream = take(self, job)
        hits.append(stream is not None)
        return stream

    monkeypatch.setattr(Lookahead, "take", counting)
    monkeypatch.setenv("WEIGHTSMITH_THREADS", "2")
    return hits


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_same_bytes_as_one_tensor_at_a_time(method, bf16_trio, counted, tmp_path, monkeypatch):
    base, *models = bf16_trio
    yml = recipe(method, base, models[: len(RECIPES[method]["models"])], tmp_path)
    r = run_cli("run", yml, "-o", tmp_path / "ahead")
    assert r.exit_code == 0, r.output
    assert sum(counted) >= 5, counted  # most tensors' statistics were made ahead
    monkeypatch.setattr(Lookahead, "starter", lambda self, job: lambda: None)
    r = run_cli("run", yml, "-o", tmp_path / "plain")
    assert r.exit_code == 0, r.output
    assert shard_bytes(tmp_path / "ahead") == shard_bytes(tmp_path / "plain")
    assert not reader._MAPS  # every input mapping released


@pytest.mark.parametrize("method", ["multislerp", "model_stock"])
def test_a_merge_run_hands_its_kept_buffers_back(method, bf16_trio, tmp_path, monkeypatch):
    """After `merge run` (in this process, as a library caller's goes on) neither the kept
    rows' pool nor this thread's span buffers are kept."""
    from weightsmith.merge.methods import sphere_native

    made = []
    init = sphere_native.RowCache.__init__
    monkeypatch.setattr(
        sphere_native.RowCache, "__init__", lambda s, *a: made.append(a) or init(s, *a)
    )
    base, *models = bf16_trio
    r = run_cli("run", recipe(method, base, models, tmp_path), "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert made  # rows were kept during the run
    assert sphere_native.RowCache._pool == []
    assert "spans" not in sphere_native._local.__dict__


def test_error_of_a_tensor_made_ahead_is_raised_in_order(tiny_model_copy, counted, tmp_path):
    base = tiny_model_copy("llama", 0, BF16)
    models = [tiny_model_copy("llama", s, BF16) for s in (1, 2)]
    name = poke(models[1], "layers.1.mlp.down_proj", float("nan"), index=5)
    out = tmp_path / "out"
    r = run_cli("run", recipe("model_stock", base, models, tmp_path), "-o", out)
    assert_one_line_error(r, name, "NaN")
    assert any(counted)  # the failing tensor's statistics ran ahead
    assert not out.exists() and list(tmp_path.glob(".out*")) == []
    assert not reader._MAPS


def test_beside_runs_on_the_pool_and_inline_without_one():
    caller = threading.current_thread()
    with compute_pool(2):
        made = beside(lambda: (threading.current_thread(), pool_workers(), pmap(abs, [-1, -2])))
        thread, workers, values = made.result()
        assert thread is not caller and workers == 2 and values == [1, 2]
        failed = beside(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failed.result()
    thread, workers, _ = beside(lambda: (threading.current_thread(), pool_workers(), 0)).result()
    assert thread is caller and workers == 1


class _Stream:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_a_stream_made_for_another_job_is_closed_not_used():
    jobs = [object(), object(), object()]
    made: list[_Stream] = []

    def make(job):
        made.append(_Stream())
        return made[-1]

    with compute_pool(2):
        ahead = Lookahead(jobs, make, eligible=lambda j: True, sizes=lambda j: 1)
        ahead.starter(jobs[0])()  # jobs[1]'s stream made beside
        assert ahead.take(jobs[2]) is None  # asked for another job: dropped
        assert made[0].closed
        ahead.starter(jobs[0])()
        assert ahead.take(jobs[1]) is made[1] and not made[1].closed
        ahead.starter(jobs[1])()
        ahead.close()  # a run that stopped: the stream made for jobs[2] is released
        assert made[2].closed


def test_jobs_too_big_together_are_not_made_ahead():
    jobs = [object(), object()]
    with compute_pool(2):
        ahead = Lookahead(
            jobs, lambda j: _Stream(), lambda j: True, sizes=lambda j: 60, max_bytes=100
        )
        ahead.starter(jobs[0])()
        assert ahead.take(jobs[1]) is None


def test_failed_stream_is_raised_by_take():
    jobs = [object(), object()]

    def make(job):
        raise CheckpointError("bad tensor")

    with compute_pool(2):
        ahead = Lookahead(jobs, make, lambda j: True, sizes=lambda j: 1)
        ahead.starter(jobs[0])()
        with pytest.raises(CheckpointError, match="bad tensor"):
            ahead.take(jobs[1])
