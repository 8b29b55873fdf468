"""Preemption edge cases of the real entrypoint: a second signal while the stop save is being
written, and a stop save that hangs (the watchdog must end the process with the preemption exit
code, leaving ``latest`` untouched). The hang is real: the checkpoint code's test hook sleeps
inside the commit protocol (``KEMPNERFORGE_CKPT_TEST_PAUSE``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
import train_harness as h

N = 8
STOP = 5


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, (
            f"run ended early with {proc.returncode}: {proc.stderr.read()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def _start(out: Path, overrides: list[str], pause: str, marker: Path) -> subprocess.Popen:
    marker.mkdir()
    env = {
        **h.env(),
        "KEMPNERFORGE_CKPT_TEST_PAUSE": pause,
        "KEMPNERFORGE_CKPT_TEST_PAUSE_MARKER": str(marker),
    }
    return subprocess.Popen(
        h.train_cmd(out, overrides),
        env=env,
        cwd=h.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_second_signal_during_the_stop_save_does_not_break_it(tmp_path: Path) -> None:
    base = tmp_path / "base"
    ref = h.run(base, [f"train.max_steps={N}"])
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "run"
    overrides = [
        f"train.max_steps={N}",
        "checkpoint.interval=100",
        f"resilience.debug_signal_step={STOP}",
    ]
    proc = _start(out, overrides, "train_state_write=3", tmp_path / "marker")
    _wait_for(tmp_path / "marker" / "train_state_write.0", proc)
    os.kill(proc.pid, signal.SIGUSR1)  # again, while the stop save is half written
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert h.latest_step(out) == STOP and h.saved_steps(out) == [STOP]

    again = h.run(out, [f"train.max_steps={N}", "checkpoint.interval=100"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert h.dedup_metrics(out) == h.metrics(base)  # every step, bit for bit


def test_watchdog_ends_a_hung_stop_save_with_the_preemption_code(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [
        f"train.max_steps={N}",
        "checkpoint.interval=100",
        f"resilience.debug_signal_step={STOP}",
        "resilience.save_watchdog_s=1",
    ]
    proc = _start(out, overrides, "pre_commit=600", tmp_path / "marker")
    _, err = proc.communicate(timeout=120)  # without the watchdog this would sleep 600 s
    assert proc.returncode == 75, err[-3000:]
    assert "watchdog" in err and f"step {STOP}" in err
    ck = out / "checkpoints"
    assert not (ck / "latest").exists() and not (ck / f"step_{STOP}").exists()
    assert (tmp_path / "marker" / "pre_commit.0").exists()  # it did hang where we made it hang
