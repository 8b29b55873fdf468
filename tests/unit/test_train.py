"""The training entrypoint in one process: metrics contract, exact resume after SIGUSR1 / SIGKILL,
freeze-stage transitions, repeated preemptions. Real runs of ``python -m kempnerforge.train``,
real signals, real checkpoints under ``tmp_path``."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
import train_harness as h

N = 12
# Embedding frozen from the start, unfrozen after step 6 while blocks.0 freezes; blocks.0
# unfreezes after step 9 and must continue from the AdamW moments it had at step 6.
FREEZE = [
    "freeze.base=[{module: embedding}]",
    "freeze.stages=[{start_step: 6, specs: [{module: embedding, frozen: false}, {module: 'blocks.0'}]},"
    " {start_step: 9, specs: [{module: 'blocks.0', frozen: false}]}]",
]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base")
    p = h.run(out, [f"train.max_steps={N}"])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def freeze_baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("freeze_base")
    p = h.run(out, [f"train.max_steps={N}", *FREEZE])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_metrics_contract(baseline: Path) -> None:
    ms = h.metrics(baseline)
    assert [m["step"] for m in ms] == list(range(1, N + 1))
    assert all(set(m) == {"step", "loss", "lr", "tokens_seen"} for m in ms)
    assert [m["tokens_seen"] for m in ms] == [12 * 32 * s for s in range(1, N + 1)]
    assert ms[-1]["loss"] < ms[0]["loss"]  # the synthetic corpus is learnable
    assert ms[2]["lr"] > ms[0]["lr"] and ms[-1]["lr"] < ms[3]["lr"]  # warmup, then decay
    assert h.saved_steps(baseline) == [4, 8, 12] and h.latest_step(baseline) == N


def test_sigusr1_random_step_resume_bit_exact(baseline: Path, tmp_path: Path) -> None:
    k = random.Random().randint(1, N - 5)
    rc, text = h.signal_at(tmp_path, [f"train.max_steps={N}"], k)
    assert rc == 75, text[-3000:]
    stop = h.latest_step(tmp_path)
    assert k <= stop < N, f"signal after step {k}, stopped at {stop}"
    assert h.metrics(tmp_path)[-1]["step"] == stop
    assert text.count(f"checkpoint step={stop} ") <= 1  # saved once (telemetry line, if shown)
    p = h.run(tmp_path, [f"train.max_steps={N}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert h.metrics(tmp_path) == h.metrics(baseline)  # every line, every bit
    h.assert_same_state(h.checkpoint_tensors(tmp_path, N), h.checkpoint_tensors(baseline, N))


def test_stop_at_interval_step_saves_once(tmp_path: Path) -> None:
    """A signal at a periodic-save step: one checkpoint of that step, not two."""
    p = h.run(
        tmp_path,
        [f"train.max_steps={N}", "resilience.debug_signal_step=4", "train.log_interval=2"],
        quiet=False,
    )
    assert p.returncode == 75, p.stderr[-3000:]
    assert h.saved_steps(tmp_path) == [4]
    assert p.stderr.count("checkpoint step=4 ") == 1  # one save's telemetry line
    assert "step 4/12" in p.stderr  # the progress line


@pytest.mark.parametrize("signal_step", [5, 6, 7])  # stage start_step=6: before, at, after
def test_freeze_transition_resume_bit_exact(
    freeze_baseline: Path, tmp_path: Path, signal_step: int
) -> None:
    rc = h.run_inproc(
        tmp_path, [f"train.max_steps={N}", *FREEZE, f"resilience.debug_signal_step={signal_step}"]
    )
    assert rc == 75
    assert h.latest_step(tmp_path) == signal_step
    assert h.run_inproc(tmp_path, [f"train.max_steps={N}", *FREEZE]) == 0
    assert h.metrics(tmp_path) == h.metrics(freeze_baseline)
    h.assert_same_state(h.checkpoint_tensors(tmp_path, N), h.checkpoint_tensors(freeze_baseline, N))


def test_freeze_changes_training(baseline: Path, freeze_baseline: Path) -> None:
    """The freeze schedule is applied (losses differ from the unfrozen run) and recorded."""
    assert h.metrics(baseline)[0]["loss"] == h.metrics(freeze_baseline)[0]["loss"]  # same init
    assert h.metrics(baseline)[-1]["loss"] != h.metrics(freeze_baseline)[-1]["loss"]
    base_emb = h.checkpoint_tensors(baseline, 4)
    frz = h.checkpoint_tensors(freeze_baseline, 4)
    init_frz = h.checkpoint_tensors(freeze_baseline, 8)
    key = "model.embedding.tok.weight"
    assert not (base_emb[key] == frz[key]).all()  # trained in the plain run
    assert (
        frz["model.blocks.0.attn.qkv.weight"] != init_frz["model.blocks.0.attn.qkv.weight"]
    ).any()


def test_three_preemptions_in_a_row(baseline: Path, tmp_path: Path) -> None:
    for stop in (3, 6, 9):
        assert (
            h.run_inproc(tmp_path, [f"train.max_steps={N}", f"resilience.debug_signal_step={stop}"])
            == 75
        )
        assert h.latest_step(tmp_path) == stop
    assert h.run_inproc(tmp_path, [f"train.max_steps={N}"]) == 0
    assert h.metrics(tmp_path) == h.metrics(baseline)
    h.assert_same_state(h.checkpoint_tensors(tmp_path, N), h.checkpoint_tensors(baseline, N))


def test_sigkill_at_random_moment_resumes_from_last_commit(baseline: Path, tmp_path: Path) -> None:
    rng = random.Random()
    proc = subprocess.Popen(
        h.train_cmd(tmp_path, [f"train.max_steps={N}", "checkpoint.interval=3"]),
        env=h.env(),
        cwd=h.REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        h.wait_for_step(tmp_path, rng.randint(3, N - 3), proc)
        time.sleep(rng.random() * 0.2)  # anywhere: mid-step, mid-save, mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    committed = h.latest_step(tmp_path)
    logged = h.metrics(tmp_path)[-1]["step"] if h.metrics(tmp_path) else 0
    assert committed <= logged
    p = h.run(tmp_path, [f"train.max_steps={N}", "checkpoint.interval=3"])
    assert p.returncode == 0, p.stderr[-3000:]
    lines = h.metrics(tmp_path)
    # Steps past the last commit are logged again, with identical values; nothing rewritten.
    assert [m["step"] for m in lines[logged:]] == list(range(committed + 1, N + 1))
    assert h.dedup_metrics(tmp_path) == h.metrics(baseline)
    h.assert_same_state(h.checkpoint_tensors(tmp_path, N), h.checkpoint_tensors(baseline, N))


def test_finished_run_restarted_does_nothing(baseline: Path) -> None:
    before = (baseline / "metrics.jsonl").read_text()
    assert h.run_inproc(baseline, [f"train.max_steps={N}"]) == 0
    assert (baseline / "metrics.jsonl").read_text() == before


def test_bad_config_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert h.run_inproc(tmp_path, ["train.max_stepz=3"]) == 2
    assert "train.max_stepz" in capsys.readouterr().err
    assert h.run_inproc(tmp_path, ["freeze.base=[{module: encoder}]"]) == 2
    assert "'encoder'" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()
