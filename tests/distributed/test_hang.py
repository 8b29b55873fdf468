"""Hang detection on 2 real ranks (gloo, CPU): a rank blocked inside a step ends the run.

Both ranks stop making step progress (rank 1 sleeps inside its step, rank 0 waits for it in the
gradient all-reduce); each rank's watchdog dumps every thread's stack into the log and exits,
rank 0 after asking the requeue guard for another run (77), and the guard stops a run that
hangs again at the same step (76). The loop is ``helpers/hang_script.py``, which the SLURM tier
runs on the cluster too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import hang_script

from kempnerforge.resilience.watchdog import HangWatchdog

pytestmark = pytest.mark.distributed

HANG_AT = 6
THRESHOLD_S = 4.0


def _run(tmp_path: Path, port: int, restart: int) -> tuple[list[int], str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "KEMPNERFORGE_"))}
    env.update(
        OMP_NUM_THREADS="1",
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        KEMPNERFORGE_JOB_ID="hang-test",
        KEMPNERFORGE_RESTART_COUNT=str(restart),
    )
    cmd = [
        sys.executable,
        *hang_script.command(
            tmp_path / "ckpt", THRESHOLD_S, hang_at=HANG_AT, max_requeues_without_progress=1
        ),
    ]
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=THRESHOLD_S + 120)[0] for p in procs]
    return [p.returncode for p in procs], "\n".join(outs), time.monotonic() - t0


def test_blocked_rank_is_detected_with_stacks_then_the_guard_stops_it(tmp_path: Path) -> None:
    codes, log, took = _run(tmp_path, 29731, 0)
    assert codes == [77, 77], log[-4000:]
    assert took < THRESHOLD_S + 60, took
    assert "rank 1 blocks inside step 6" in log
    assert re.search(r"kempnerforge hang: rank=0 no step progress for \d+s after step 5", log)
    assert "requeue=granted exit=77" in log
    assert "kempnerforge hang: rank=1" in log
    # faulthandler's dump of every thread, with the line rank 1 sleeps on
    assert log.count("Thread 0x") >= 2
    assert re.search(r'hang_script\.py", line \d+ in block_inside_step', log), log[-3000:]
    # the same hang at the same step again: no progress since the last requeue -> the guard
    # allows one stall (max_requeues_without_progress=1), then refuses
    codes, log, _ = _run(tmp_path, 29741, 1)
    assert codes == [77, 77], log[-3000:]
    codes, log, _ = _run(tmp_path, 29751, 2)
    assert codes[0] == 76 and "requeue=refused" in log, log[-3000:]


def test_automatic_threshold_follows_the_measured_step_time() -> None:
    w = HangWatchdog(lambda m: 0, factor=10, min_s=0.5, warmup=3, poll_s=3600)
    assert w.threshold() is None
    for step in range(4):
        w.beat(step)
        time.sleep(0.1)
    assert w.threshold() == pytest.approx(1.0, rel=0.3)  # 10 x ~0.1 s
    w.pause()  # a long save is not a step
    time.sleep(0.3)
    w.beat(5)
    assert w.threshold() == pytest.approx(1.0, rel=0.3)
    fixed = HangWatchdog(lambda m: 0, timeout_s=7, poll_s=3600)
    assert fixed.threshold() == 7
    w.stop()
    fixed.stop()
