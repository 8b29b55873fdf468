"""The own-loop example with everything a user's loop carries, through preemptions and a kill.

One process and two DDP ranks under the local launcher (``--requeue-on-crash``): gradient
accumulation, clipping,
autocast with a GradScaler, an EMA, counters of its own, a StatefulDataLoader with 2 forked
workers and async saves, all handed over once as ``states``. The launcher gets SIGUSR1 twice,
then the last rank's training process is SIGKILLed. Every loss (the steps redone after the kill
included) and the final weights, EMA, moments, scaler and counters equal an uninterrupted run.
Workers forked during an async save end promptly (no step of a process takes 3 s), and the
job lock stays held while they come and go, read from this (a third) process in /proc/locks,
without touching the lock. Afterwards ``kempnerforge report`` tells the story: four runs, two
preemptions and a crash, the steps the kill lost, and a split of the wall time that adds up.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers.own_loop import assert_same_final, local_launch, losses, rows

pytestmark = pytest.mark.distributed

ARGS = ["--async-save", "--accum", "2", "--batch-size", "16", "--interval", "3"]
STEPS = {1: 48, 2: 24}  # 512 samples / ranks / 16 per batch / 2 micro-batches, 3 epochs


def _flock_holders(path: Path) -> set[int]:
    """Pids holding an exclusive flock on ``path`` (from /proc/locks; nothing is locked)."""
    st = path.stat()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    held = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if "FLOCK" in f and "WRITE" in f and f[f.index("WRITE") + 2] == dev:
            held.add(int(f[f.index("WRITE") + 1]))
    return held


class LockWatch(threading.Thread):
    """Reads who holds the job lock every few ms, noting how many loss lines existed then. A
    reading taken between two loss lines of the same process (it was training throughout) must
    find the lock held; which readings those are is known once the run is over."""

    def __init__(self, out: Path) -> None:
        super().__init__(daemon=True)
        self.out, self.done = out, threading.Event()
        self.readings: list[tuple[int, bool]] = []

    def run(self) -> None:
        lock = self.out / "checkpoints" / ".lock"
        while not self.done.is_set():
            n = len(rows(self.out))
            if n and lock.exists():
                self.readings.append((n, bool(_flock_holders(lock))))
            time.sleep(0.005)

    def while_training(self) -> tuple[int, list[int]]:
        """(readings taken while a process trained, the steps after which the lock was free)."""
        final = rows(self.out)
        during = [
            (final[n - 1]["step"], held)
            for n, held in self.readings
            if n < len(final) and final[n - 1]["pid"] == final[n]["pid"]
        ]
        return len(during), [step for step, held in during if not held]


def _training_pid(out: Path, rank: int) -> int:
    """The example's training process of ``rank`` (not one of its DataLoader workers)."""
    mine = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            environ = (d / "environ").read_bytes().split(b"\0")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        ours = str(out).encode() in cmd and b"own_loop.py" in b" ".join(cmd)
        if ours and f"RANK={rank}".encode() in environ:
            mine.append((int(d.name), ppid))
    pids = {p for p, _ in mine}
    roots = [p for p, ppid in mine if ppid not in pids]
    assert len(roots) == 1, mine
    return roots[0]


def _wait_rows(out: Path, n: int, proc, after_pid: int | None = None) -> dict:
    deadline = time.monotonic() + 240
    while True:
        got = rows(out)
        if len(got) >= n and (after_pid is None or got[-1]["pid"] != after_pid):
            return got[-1]
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, f"{n} steps not reached"
        time.sleep(0.02)


@pytest.mark.parametrize("nproc", [1, 2])
def test_user_state_through_two_preemptions_and_a_kill(tmp_path: Path, nproc: int) -> None:
    steps = STEPS[nproc]
    ref = tmp_path / "ref"
    proc = local_launch(ref, nproc, ARGS)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    out = tmp_path / "pre"
    rng = random.Random()
    s1, s2 = rng.randint(2, steps // 4), rng.randint(steps // 3, steps // 2)
    kill_at = rng.randint(s2 + 5, steps * 3 // 4)  # a save after s2: the resume step advanced
    t0 = time.monotonic()
    proc = local_launch(
        out, nproc, ARGS, ["--requeue-on-crash", "--checkpoint-dir", str(out / "checkpoints")]
    )
    watch = LockWatch(out)
    watch.start()
    try:
        last = _wait_rows(out, s1, proc)
        proc.send_signal(signal.SIGUSR1)
        last = _wait_rows(out, s1 + 2, proc, after_pid=last["pid"])  # restarted, training
        last = _wait_rows(out, s2, proc)
        proc.send_signal(signal.SIGUSR1)
        last = _wait_rows(out, s2 + 2, proc, after_pid=last["pid"])
        killed = _wait_rows(out, kill_at, proc)["pid"]
        os.kill(_training_pid(out, nproc - 1), signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
        launcher_wall = time.monotonic() - t0
    finally:
        watch.done.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    assert output.count("kempnerforge stop: reason=preemption signal=SIGUSR1") == 2, output[-3000:]
    assert re.search(r"restart 2: exit codes \[[^\]]*-9[^\]]*\]", output), output[-3000:]

    want, got = losses(ref), losses(out)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    bad = [s for s in want if any(v != want[s][0] for v in got[s])]
    assert not bad, f"losses differ at steps {bad}"
    assert any(len(v) > 1 for v in got.values()), "the kill lost no step: nothing was redone"
    assert_same_final(out, ref, steps)

    by_process = rows(out)
    slow = [
        (b["step"], round(b["dt"], 2))
        for a, b in itertools.pairwise(by_process)
        if a["pid"] == b["pid"] and b["dt"] >= 3.0
    ]
    assert not slow, f"steps slower than 3 s (forked workers stalled): {slow}"
    checked, free = watch.while_training()
    assert checked >= 50, checked
    assert not free, f"job lock free while training, after steps {sorted(set(free))}"

    # what the faults cost, from the run ledger
    last_of_killed = max(i for i, r in enumerate(by_process) if r["pid"] == killed)
    reached = by_process[last_of_killed]["step"]
    resumed = by_process[last_of_killed + 1]["step"] - 1  # the next run's first step, less one
    report = _report(out / "checkpoints", tmp_path / "timeline.png")
    assert len(report["runs"]) == 4, report["runs"]
    assert report["faults"]["preemption"]["count"] == 2, report["faults"]
    assert report["faults"]["crash"]["count"] == 1, report["faults"]
    assert report["lost_steps"] == reached - resumed, (reached, resumed, report["runs"])
    assert report["runs"][3]["resumed_step"] == resumed
    assert abs(sum(report["parts"].values()) - report["wall_s"]) <= 0.05 * report["wall_s"]
    assert abs(report["wall_s"] - launcher_wall) <= 0.10 * launcher_wall, (
        report["wall_s"],
        launcher_wall,
    )
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def _report(checkpoints: Path, plot: Path) -> dict:
    import json
    import subprocess
    import sys

    args = [sys.executable, "-m", "kempnerforge.cli", "report", str(checkpoints)]
    got = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    drawn = subprocess.run(
        [*args, "--plot", str(plot)], capture_output=True, text=True, timeout=120
    )
    assert drawn.returncode == 0, drawn.stderr
    return json.loads(got.stdout)
