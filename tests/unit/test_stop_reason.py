"""Why a job stops, from what the SLURM controller shows (the fields ``scontrol show job``
printed on the dev cluster in each case; the live cases run in tests/slurm/test_faults.py)."""

from __future__ import annotations

import pytest

from kempnerforge.job import JobEnvironment
from kempnerforge.resilience.config import ResilienceConfig
from kempnerforge.resilience.reason import (
    STOP_SIGNAL,
    STOP_TERMINATE,
    classify_stop,
    slurm_seconds,
)

SLURM = JobEnvironment.from_env({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"})
RUNNING = {"JobState": "RUNNING", "Reason": "None", "Restarts": "1", "PreemptTime": "None"}


@pytest.mark.parametrize(
    ("kind", "fields", "reason", "save", "requeue"),
    [
        (STOP_TERMINATE, {**RUNNING, "JobState": "COMPLETING"}, "user-cancel", True, False),
        (STOP_TERMINATE, {**RUNNING, "JobState": "CANCELLED"}, "user-cancel", True, False),
        (STOP_TERMINATE, {**RUNNING, "JobState": "COMPLETING", "Reason": "TimeLimit"},
         "time-limit-no-lead", False, False),
        (STOP_TERMINATE, {**RUNNING, "JobState": "COMPLETING", "Restarts": "2"},
         "requeued", True, False),
        (STOP_SIGNAL, {**RUNNING, "PreemptTime": "2026-12-02T10:00:00"}, "preemption", True, True),
        (STOP_TERMINATE, {**RUNNING, "PreemptTime": "2026-12-02T10:00:00"},
         "preemption", True, True),
        (STOP_SIGNAL, {**RUNNING, "TimeLimit": "00:01:00", "RunTime": "00:00:35"},
         "time-limit", True, True),
        (STOP_SIGNAL, {**RUNNING, "TimeLimit": "1-00:00:00", "RunTime": "00:05:00"},
         "preemption-signal", True, True),
        (STOP_TERMINATE, {**RUNNING, "TimeLimit": "01:00:00", "RunTime": "00:05:00"},
         "user-cancel", True, False),
    ],
)  # fmt: skip
def test_the_controllers_view_decides(kind, fields, reason, save, requeue) -> None:
    r = classify_stop(kind, ResilienceConfig(), SLURM, fields)
    assert (r.kind, r.save, r.requeue) == (reason, save, requeue), r
    assert "JobState=" in r.detail


def test_outside_slurm_sigterm_is_a_cancel_unless_configured() -> None:
    plain = JobEnvironment.from_env({})
    assert classify_stop(STOP_TERMINATE, ResilienceConfig(), plain).kind == "user-cancel"
    assert classify_stop(STOP_SIGNAL, ResilienceConfig(), plain).kind == "preemption"
    cfg = ResilienceConfig(sigterm_without_slurm="preemption")
    assert classify_stop(STOP_TERMINATE, cfg, plain).requeue


def test_unreachable_controller_is_treated_as_preemption(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol to ask
    r = classify_stop(STOP_SIGNAL, ResilienceConfig(), SLURM)
    assert (r.kind, r.save, r.requeue) == ("unknown", True, True)


def test_slurm_durations() -> None:
    assert slurm_seconds("00:01:00") == 60
    assert slurm_seconds("1-02:03:04") == 93784
    assert slurm_seconds("05:06") == 306
    assert slurm_seconds("UNLIMITED") is None
