"""The requeue loop guard's bookkeeping, outside SLURM (real files in tmp_path, no mocks).

The requeue itself (`scontrol requeue` from inside a job) is exercised on the real dev cluster in
test_e2e.py; here only the decision and its durable state are checked.
"""

from __future__ import annotations

import json

import pytest

from kempnerforge.checkpoint.storage import GUARD_FILE
from kempnerforge.resilience.config import ResilienceConfig
from kempnerforge.resilience.requeue import (
    REQUEUE_REFUSED_EXIT_CODE,
    exit_code_after_preemption,
    last_decision,
    maybe_requeue,
)


@pytest.fixture(autouse=True)
def _local_job(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KEMPNERFORGE_JOB_ID", "job-a")


def test_progress_always_requeues(tmp_path):
    cfg = ResilienceConfig(max_requeues_without_progress=0)
    for step in (5, 9, 13, 20):
        assert maybe_requeue(cfg, str(tmp_path), step)
    state = last_decision(tmp_path)
    assert state is not None and state.requeues == 4 and state.last_step == 20
    assert state.stalls == 0 and state.refused is None


def test_stalls_stop_after_the_limit(tmp_path):
    cfg = ResilienceConfig(max_requeues_without_progress=2)
    assert maybe_requeue(cfg, str(tmp_path), 7)  # first requeue: progress by definition
    assert maybe_requeue(cfg, str(tmp_path), 7)  # stall 1 of 2
    assert maybe_requeue(cfg, str(tmp_path), 7)  # stall 2 of 2
    assert not maybe_requeue(cfg, str(tmp_path), 7)  # stall 3: refused
    state = last_decision(tmp_path)
    assert state is not None and state.requeues == 3
    assert state.refused is not None and "max_requeues_without_progress=2" in state.refused
    assert [h["action"] for h in state.history] == ["requeue"] * 3 + ["refused"]
    assert exit_code_after_preemption(cfg, False) == REQUEUE_REFUSED_EXIT_CODE


def test_progress_resets_the_stall_count(tmp_path):
    cfg = ResilienceConfig(max_requeues_without_progress=1)
    assert maybe_requeue(cfg, str(tmp_path), 3)
    assert maybe_requeue(cfg, str(tmp_path), 3)  # stall 1 of 1
    assert maybe_requeue(cfg, str(tmp_path), 4)  # progress
    assert maybe_requeue(cfg, str(tmp_path), 4)  # stall 1 of 1 again
    assert not maybe_requeue(cfg, str(tmp_path), 4)


def test_no_checkpoint_at_all_counts_as_a_stall(tmp_path):
    cfg = ResilienceConfig(max_requeues_without_progress=1)
    assert maybe_requeue(cfg, str(tmp_path), None)
    assert maybe_requeue(cfg, str(tmp_path), None)
    assert not maybe_requeue(cfg, str(tmp_path), None)


def test_total_limit(tmp_path):
    cfg = ResilienceConfig(max_requeues=2)
    assert maybe_requeue(cfg, str(tmp_path), 1)
    assert maybe_requeue(cfg, str(tmp_path), 2)
    assert not maybe_requeue(cfg, str(tmp_path), 3)
    state = last_decision(tmp_path)
    assert state is not None and "max_requeues=2" in (state.refused or "")


def test_a_new_job_starts_fresh(tmp_path, monkeypatch):
    cfg = ResilienceConfig(max_requeues=1)
    assert maybe_requeue(cfg, str(tmp_path), 1)
    assert not maybe_requeue(cfg, str(tmp_path), 2)
    monkeypatch.setenv("KEMPNERFORGE_JOB_ID", "job-b")
    assert maybe_requeue(cfg, str(tmp_path), 2)


def test_state_file_is_complete_json_and_no_temp_left(tmp_path):
    cfg = ResilienceConfig()
    maybe_requeue(cfg, str(tmp_path), 11)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [GUARD_FILE]
    data = json.loads((tmp_path / GUARD_FILE).read_text())
    assert data["job_id"] == "job-a" and data["last_step"] == 11


def test_corrupt_state_starts_fresh(tmp_path):
    (tmp_path / GUARD_FILE).write_text("{not json")
    assert maybe_requeue(ResilienceConfig(max_requeues=1), str(tmp_path), 1)


def test_requeue_disabled(tmp_path):
    cfg = ResilienceConfig(requeue=False)
    assert not maybe_requeue(cfg, str(tmp_path), 5)
    assert not (tmp_path / GUARD_FILE).exists()
    assert exit_code_after_preemption(cfg, False) == cfg.exit_code
