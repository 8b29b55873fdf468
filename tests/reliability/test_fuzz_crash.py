"""Crash-consistency fuzzing of real training runs (SIGKILL at random moments and inside every
phase of the save protocol), CI-sized and soak-sized. See fuzz_crash.py for what a trial is."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_crash import fuzz


def _check(trials: int, tmp_path: Path, seed: int) -> None:
    summary, table = fuzz(trials, tmp_path / "fuzz", seed=seed, echo=False)
    print(table)
    assert summary.trials >= trials, table
    assert summary.wrong == 0, table  # every restart that loaded, loaded latest's step
    assert summary.max_lost_steps == 0, table
    assert summary.loads >= trials // 2, table  # not vacuous: most restarts did reach a load
    assert summary.loads_ok == summary.loads, table
    assert summary.campaigns_bit_equal == summary.campaigns, table
    assert len(summary.plans) >= 4, table  # kills landed at several kinds of moments
    assert summary.ok, table


def test_fuzz_crash_ci(tmp_path: Path) -> None:
    _check(20, tmp_path, seed=0)


@pytest.mark.slow
def test_fuzz_crash_soak(tmp_path: Path) -> None:
    _check(200, tmp_path, seed=12345)
