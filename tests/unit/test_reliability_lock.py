"""The job-level writer lock on a checkpoint directory (real flock, real processes, real SIGKILL).

Another *host* cannot be real here: its holder is simulated by writing a lock record that names
a different host name (the code then trusts only the heartbeat, as it would across nodes).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kempnerforge.checkpoint import lock as lockmod
from kempnerforge.checkpoint.lock import (
    CheckpointDirLockedError,
    acquire_job_lock,
    current_job_id,
    read_holder,
)

# lock.py needs only the standard library: load it by path so each holder process starts in
# milliseconds (importing the package would import torch).
HOLDER = textwrap.dedent(
    f"""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("kflock", {str(Path(lockmod.__file__))!r})
    mod = sys.modules["kflock"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    acquire_job_lock = mod.acquire_job_lock
    lk = acquire_job_lock(sys.argv[1], job_id=sys.argv[2] if len(sys.argv) > 2 else None)
    print("LOCKED", lk.owns_flock, flush=True)
    time.sleep(600)
    """
)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "KEMPNERFORGE_JOB_ID"))
    }
    env.pop("LOCAL_RANK", None)
    env.update(extra)
    return env


def _spawn_holder(directory: Path, job_id: str | None = None, **env: str) -> subprocess.Popen:
    args = [sys.executable, "-c", HOLDER, str(directory)] + ([job_id] if job_id else [])
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=_clean_env(**env))
    line = p.stdout.readline()
    assert line.startswith("LOCKED"), f"holder did not lock: {line!r}"
    return p


def test_managers_in_one_process_share_the_lock(tmp_path: Path) -> None:
    a = acquire_job_lock(tmp_path, job_id="job-A")
    b = acquire_job_lock(tmp_path, job_id="job-A")
    assert a.owns_flock and b.owns_flock
    assert read_holder(tmp_path).job_id == "job-A"
    a.release()
    # b still holds: another job is still refused
    with pytest.raises(CheckpointDirLockedError):
        acquire_job_lock(tmp_path, job_id="job-B", wait_s=0.2)
    b.release()
    assert read_holder(tmp_path) is None  # clean release removes the record
    acquire_job_lock(tmp_path, job_id="job-B").release()


def test_second_job_refused_with_holder_named(tmp_path: Path) -> None:
    holder = _spawn_holder(tmp_path, "slurm:4242")
    try:
        with pytest.raises(CheckpointDirLockedError) as ei:
            acquire_job_lock(tmp_path, job_id="slurm:777", wait_s=0.2)
        msg = str(ei.value)
        assert "slurm:4242" in msg and str(holder.pid) in msg and socket.gethostname() in msg
        assert "since" in msg and str(tmp_path) in msg
    finally:
        holder.kill()
        holder.wait()


def test_sigkilled_holder_does_not_lock_forever(tmp_path: Path) -> None:
    holder = _spawn_holder(tmp_path, "job-dead")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert read_holder(tmp_path).job_id == "job-dead"  # the record survives the kill...
    lk = acquire_job_lock(tmp_path, job_id="job-next", wait_s=0.2)  # ...but the lock does not
    assert read_holder(tmp_path).job_id == "job-next"
    lk.release()


def test_requeued_slurm_job_gets_its_directory_back(tmp_path: Path) -> None:
    holder = _spawn_holder(tmp_path, None, SLURM_JOB_ID="9001")
    holder.kill()
    holder.wait()
    assert read_holder(tmp_path).job_id == "slurm:9001"
    # the requeued incarnation (same SLURM_JOB_ID) and an unrelated job both get in now;
    # while the requeued one holds it, the unrelated one is refused.
    again = _spawn_holder(tmp_path, None, SLURM_JOB_ID="9001")
    try:
        with pytest.raises(CheckpointDirLockedError, match="slurm:9001"):
            acquire_job_lock(tmp_path, job_id="slurm:1", wait_s=0.2)
    finally:
        again.kill()
        again.wait()


def test_processes_of_one_job_share_it(tmp_path: Path) -> None:
    """A torchrun-like child of the same run (run id inherited through the env) is let in."""
    holder = _spawn_holder(tmp_path, None, KEMPNERFORGE_JOB_ID="run-xyz")
    try:
        member = subprocess.run(
            [sys.executable, "-c", HOLDER.replace("time.sleep(600)", ""), str(tmp_path)],
            capture_output=True,
            text=True,
            env=_clean_env(KEMPNERFORGE_JOB_ID="run-xyz"),
            timeout=60,
        )
        assert member.returncode == 0, member.stderr
        assert member.stdout.strip() == "LOCKED False"  # joined without taking the kernel lock
        assert read_holder(tmp_path).pid == holder.pid
        stranger = subprocess.run(
            [sys.executable, "-c", HOLDER.replace("time.sleep(600)", ""), str(tmp_path)],
            capture_output=True,
            text=True,
            env=_clean_env(KEMPNERFORGE_JOB_ID="other"),
            timeout=60,
        )
        assert stranger.returncode != 0
        assert "locked by job 'run-xyz'" in stranger.stderr
    finally:
        holder.kill()
        holder.wait()


def _fake_remote_record(directory: Path, age_s: float) -> None:
    rec = directory / lockmod.RECORD_FILE
    rec.write_text(
        json.dumps(
            {
                "job_id": "slurm:55",
                "host": "node-elsewhere-17",
                "pid": 1,
                "since": time.time() - 3600,
                "user": "alice",
            }
        )
    )
    t = time.time() - age_s
    os.utime(rec, (t, t))


def test_holder_on_another_host_judged_by_heartbeat(tmp_path: Path) -> None:
    _fake_remote_record(tmp_path, age_s=5)
    with pytest.raises(CheckpointDirLockedError, match="node-elsewhere-17"):
        acquire_job_lock(tmp_path, job_id="job-here", wait_s=0.1, stale_after_s=60, heartbeat_s=5)
    _fake_remote_record(tmp_path, age_s=300)
    lk = acquire_job_lock(tmp_path, job_id="job-here", wait_s=0.1, stale_after_s=60, heartbeat_s=5)
    assert read_holder(tmp_path).host == socket.gethostname()
    lk.check()
    lk.release()


def test_heartbeat_refreshes_and_check_sees_a_takeover(tmp_path: Path) -> None:
    lk = acquire_job_lock(tmp_path, job_id="job-hb", heartbeat_s=0.05, stale_after_s=5)
    rec = tmp_path / lockmod.RECORD_FILE
    old = time.time() - 100
    os.utime(rec, (old, old))
    deadline = time.time() + 10
    while rec.stat().st_mtime < old + 50 and time.time() < deadline:
        time.sleep(0.05)
    assert rec.stat().st_mtime > old + 50, "heartbeat never refreshed the record"
    _fake_remote_record(tmp_path, age_s=0)  # someone overwrote our record
    with pytest.raises(CheckpointDirLockedError, match="taken over"):
        lk.check()
    lk.release()


def test_current_job_id_never_changes_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A library call must not define the run's identity for children started later."""
    for k in list(os.environ):
        if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in ("KEMPNERFORGE_JOB_ID", "LOCAL_RANK"):
            monkeypatch.delenv(k)
    before = dict(os.environ)
    job = current_job_id()
    assert current_job_id() == job and job.startswith("run:")
    assert dict(os.environ) == before
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert current_job_id() == "slurm:123"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert current_job_id() == "slurm:120_3"


def test_bad_timings_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="heartbeat_s < stale_after_s"):
        acquire_job_lock(tmp_path, job_id="x", heartbeat_s=10, stale_after_s=5)


def test_lock_inherited_by_an_orphan_is_taken_over(tmp_path: Path) -> None:
    """The holder dies, but a child it forked keeps the lock file open (so the flock stays):
    the record's dead pid shows it is an orphan, and a new job gets in after ``wait_s``."""
    child_code = HOLDER.replace(
        "time.sleep(600)",
        "import os\npid = os.fork()\nif pid == 0:\n    time.sleep(600)\nprint(pid, flush=True)\nos._exit(0)",
    )
    p = subprocess.Popen(
        [sys.executable, "-c", child_code, str(tmp_path), "job-parent"],
        stdout=subprocess.PIPE,
        text=True,
        env=_clean_env(),
    )
    assert p.stdout.readline().startswith("LOCKED")
    orphan = int(p.stdout.readline())
    p.wait()
    try:
        lk = acquire_job_lock(tmp_path, job_id="job-new", wait_s=0.5)
        assert read_holder(tmp_path).job_id == "job-new"
        lk.release()
    finally:
        os.kill(orphan, signal.SIGKILL)


def test_a_release_from_a_finalizer_inside_an_acquire_does_not_deadlock(tmp_path: Path) -> None:
    """A manager dropped without close() releases its lock from a GC finalizer, which can run
    in the middle of another acquire (any allocation may collect): the registry's mutex must
    let the same thread in again."""
    import threading

    from kempnerforge.checkpoint import lock as lock_mod

    first = lock_mod.acquire_job_lock(tmp_path / "a", job_id="job-a")
    done = threading.Event()

    def acquire_while_finalizing() -> None:
        with lock_mod._registry_mutex:  # what acquire_job_lock holds while it works
            first.release()  # what the finalizer of a dropped manager does
        done.set()

    t = threading.Thread(target=acquire_while_finalizing, daemon=True)
    t.start()
    t.join(timeout=10)
    assert done.is_set(), "release inside an acquire deadlocked"
