"""Issue #16 cases outside the I/O layer: distill/eval/compare inputs that used to exit 3,
overwrite an input, replace an output without --force, or leave temporaries behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from weightsmith.testing.shared import shared_model, shared_text

BASE = shared_model("stories260K")
pytestmark = [
    pytest.mark.skipif(BASE is None, reason="needs ../shared/models/stories260K"),
]


def ws(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "weightsmith", *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = shared_text("tinystories_valid.txt")
    if src is None:
        pytest.skip("needs ../shared/data/tinystories_valid.txt")
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(src.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "p.jsonl"
    rows = [{"prompt": "Once upon a time"}, {"prompt": "The cat"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_reference_with_smaller_vocabulary_is_bad_input(text: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    v256 = tmp_path / "v256"
    model = AutoModelForCausalLM.from_pretrained(BASE)
    model.resize_token_embeddings(256)
    model.save_pretrained(v256)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASE / f, v256 / f)
    line = one_error_line(ws("eval", "ppl", BASE, "--data", text, "--seq-len", "64",
                             "--max-tokens", "256", "--reference", v256, "--no-progress"))  # fmt: skip
    assert "v256" in line and "256" in line and "512" in line


def test_generate_refuses_to_overwrite_its_prompts(prompts: Path, tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    shutil.copy(prompts, p)
    before = p.read_bytes()
    proc = ws("distill", "generate", "--teacher", BASE, "--prompts", p, "-o", p, "--force",
              "--max-new-tokens", "4", "--no-progress")  # fmt: skip
    assert "p.jsonl" in one_error_line(proc)
    assert p.read_bytes() == before


def test_feedback_checks_arguments_before_running_the_judge(prompts: Path, tmp_path: Path) -> None:
    marker = tmp_path / "judge-ran"
    judge = tmp_path / "judge.py"
    judge.write_text(
        f"open({str(marker)!r}, 'w').write('x')\ndef score(prompt, completion):\n    return 1.0\n"
    )
    out = tmp_path / "prefs.jsonl"
    out.write_text("keep me\n")
    proc = ws("distill", "feedback", "--prompts", prompts, "--candidates", f"{BASE},{BASE}",
              "--judge", f"{judge}:score", "-o", out, "--max-new-tokens", "4", "--no-progress")  # fmt: skip
    assert "prefs.jsonl" in one_error_line(proc)
    assert not marker.exists(), "the judge file ran before the arguments were checked"
    assert out.read_text() == "keep me\n"


def test_feedback_judge_with_wrong_signature_is_bad_input(prompts: Path, tmp_path: Path) -> None:
    proc = ws("distill", "feedback", "--prompts", prompts, "--candidates", f"{BASE},{BASE}",
              "--judge", "json:loads", "-o", tmp_path / "prefs.jsonl", "--max-new-tokens", "2",
              "--no-progress")  # fmt: skip
    assert "json:loads" in one_error_line(proc)
    assert not (tmp_path / "prefs.jsonl").exists()


def test_qat_keep_trained_never_replaces_without_force(text: Path, tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("precious")
    proc = ws("compress", "qat", BASE, "-o", tmp_path / "out", "--data", text, "--steps", "1",
              "--batch-size", "1", "--seq-len", "32", "--group-size", "-1",
              "--keep-trained", keep, "--no-progress")  # fmt: skip
    assert "keep" in one_error_line(proc)
    assert (keep / "mine.txt").read_text() == "precious"
    assert not (tmp_path / "out").exists()


def test_dpo_interrupted_in_reference_pass_leaves_nothing(tmp_path: Path) -> None:
    import os
    import signal
    import time

    data = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": f"Once {i}", "chosen": " upon a time there was", "rejected": " the cat"}
        for i in range(20000)
    ]  # fmt: skip  (a pass long enough to be caught under load)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo"
    cmd = [sys.executable, "-m", "weightsmith", "distill", "--method", "dpo", "--student",
           str(BASE), "--data", str(data), "-o", str(out), "--steps", "1", "--batch-size", "2",
           "--seq-len", "32", "--no-progress"]  # fmt: skip
    # Ctrl-C as from a terminal: SIGINT at its default in the child even when this test runs
    # under a shell that ignores it (a backgrounded CI job: `cmd &` without job control)
    default_int = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=default_int)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".ref-logps-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "no reference pass seen"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefs.jsonl"]


def test_compare_plot_into_unwritable_place_fails_before_work(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = ws("compare", BASE, BASE, "--plot", afile / "d.png")
    assert "afile" in one_error_line(proc)


def test_no_progress_hides_transformers_bars(text: Path) -> None:
    proc = ws("eval", "ppl", BASE, "--data", text, "--seq-len", "64", "--max-tokens", "128",
              "--reference", BASE, "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Loading" not in proc.stderr and "%|" not in proc.stderr, proc.stderr


def test_no_progress_hides_every_library_bar(text: Path, tmp_path: Path) -> None:
    # a compressed-tensors model: loading it runs compressed-tensors' and accelerate's own tqdm
    # bars ("Decompressing model", "Dispatching model"), which are not transformers'
    pytest.importorskip("compressed_tensors")
    q = tmp_path / "q"
    made = ws("compress", "quantize", BASE, "-o", q, "--bits", "8", "--group-size", "-1",
              "--no-progress")  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    proc = ws("eval", "ppl", q, "--data", text, "--seq-len", "64", "--max-tokens", "128",
              "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "%|" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr
    shown = ws("eval", "ppl", q, "--data", text, "--seq-len", "64", "--max-tokens", "128")
    assert "Decompressing model" in shown.stderr  # the bars this silences exist


def test_eval_of_a_checkpoint_without_tensors_is_refused(text: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    empty = tmp_path / "empty"
    empty.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASE / f, empty / f)
    save_file({}, empty / "model.safetensors")
    line = one_error_line(ws("eval", "ppl", empty, "--data", text, "--seq-len", "64",
                             "--max-tokens", "128", "--no-progress"))  # fmt: skip
    assert "empty" in line and "no tensors" in line
