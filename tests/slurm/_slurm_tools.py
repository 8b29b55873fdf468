"""Helpers for the SLURM end-to-end tests: submit, wait, signal, read logs and metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kempnerforge.resilience.reason import slurm_seconds

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SUBMIT = REPO / "launch" / "submit.py"
DEBUG_CONFIG = REPO / "configs" / "debug.yaml"
JOB_PREFIX = "kftest"
ISOLATED = "isolated"  # the dev cluster's partition of nodes that a job can have to itself

# The job every end-to-end test trains: the debug config, shrunk so that startup dominates.
TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "train.max_steps=24",
    "train.log_interval=4",
    "checkpoint.interval=100",
]
MAX_STEPS = 24
WORLD = 2
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
_FIELDS = re.compile(r"(\w+(?::\w+)?)=(\S*)")


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHON"] = PYTHON  # read by the sbatch templates
    return env


def run(
    cmd: list[str], timeout: float = 120, env_extra: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
    env = {**job_env(), **(env_extra or {})}
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


def job_info(job_id: str) -> dict[str, str]:
    """The job as the controller shows it now (one ``scontrol`` call)."""
    res = run(["scontrol", "show", "job", "-o", job_id], timeout=30)
    assert res.returncode == 0, f"scontrol show job {job_id}: {res.stderr}"
    return dict(_FIELDS.findall(res.stdout))


class _Board:
    """Every job, from one ``scontrol show job`` at most every ``max_age`` seconds, for all the
    threads that wait on jobs at once: one call per interval instead of one per waiting thread
    per poll (each call is a process start on a machine whose cores the jobs need)."""

    def __init__(self, max_age: float = 1.0) -> None:
        self.max_age = max_age
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._jobs: dict[str, dict[str, str]] = {}

    def get(self, job_id: str) -> dict[str, str]:
        with self._lock:
            if time.monotonic() - self._at > self.max_age:
                res = run(["scontrol", "show", "job", "-o"], timeout=30)
                assert res.returncode == 0, f"scontrol show job: {res.stderr}"
                jobs = (dict(_FIELDS.findall(line)) for line in res.stdout.splitlines())
                self._jobs = {j["JobId"]: j for j in jobs if "JobId" in j}
                self._at = time.monotonic()
            seen = self._jobs.get(job_id)
        return seen if seen is not None else job_info(job_id)  # newer than the last listing


_BOARD = _Board()


def job_state(job_id: str) -> dict[str, str]:
    """The job as the controller showed it at most a second ago (for polling)."""
    return _BOARD.get(job_id)


def wait_until(
    what: str,
    pred: Callable[[], bool],
    timeout: float,
    job_id: str | None = None,
    poll: float = 0.2,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if job_id is not None and job_state(job_id).get("JobState") in FINAL and not pred():
            raise AssertionError(f"job {job_id} ended ({job_info(job_id)}) before: {what}")
        time.sleep(poll)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for: {what}"
        + (f"; job {job_info(job_id)}" if job_id else "")
    )


def wait_final(job_id: str, timeout: float = 300) -> dict[str, str]:
    wait_until(
        f"job {job_id} to end",
        lambda: job_state(job_id).get("JobState") in FINAL,
        timeout,
        poll=0.5,
    )
    return job_info(job_id)


def restarts(job_id: str) -> int:
    return int(job_state(job_id).get("Restarts", "0"))


def limit_from_now(job_id: str, at_least_s: int) -> None:
    """Set ``job_id``'s time limit to the first whole minute of run time (SLURM counts limits in
    minutes) at least ``at_least_s`` from now: where the limit falls then no longer depends on
    how long the job took to start, which on a busy host can be most of a minute."""
    ran = slurm_seconds(job_info(job_id).get("RunTime", ""))
    assert ran is not None, job_info(job_id)
    res = run(
        ["scontrol", "update", f"jobid={job_id}", f"TimeLimit={-(-(ran + at_least_s) // 60)}"]
    )
    assert res.returncode == 0, res.stderr


def metrics(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip().endswith("}")]


def n_metrics(path: Path) -> int:
    return len(metrics(path))


def signal_job(job_id: str, sig: str = "USR1") -> None:
    res = run(["scancel", f"--signal={sig}", job_id], timeout=30)
    assert res.returncode == 0, res.stderr


def preempt_at(
    job_id: str, metrics_path: Path, restart: int, min_new_lines: int, timeout: float = 300
) -> None:
    """Once run ``restart`` has logged ``min_new_lines`` more steps, send USR1 to every task."""
    base = n_metrics(metrics_path) if restart else 0
    wait_until(
        f"run {restart} of job {job_id} to log {min_new_lines} steps",
        lambda: restarts(job_id) == restart and n_metrics(metrics_path) >= base + min_new_lines,
        timeout,
        job_id,
    )
    signal_job(job_id)


# How many submit.py may run at once: each validates the training config first, which imports
# torch (seconds of CPU); a dozen at once, beside the jobs already running, take minutes each.
_SUBMITTING = threading.BoundedSemaphore(2)


def submit(args: list[str], prefix: list[str] | None = None) -> str:
    """``submit.py ARGS`` (run under ``prefix``, e.g. ``prlimit ...``); returns the job id."""
    with _SUBMITTING:
        res = run([*(prefix or []), PYTHON, SUBMIT, *args], timeout=300)
    assert res.returncode == 0, f"submit.py failed:\n{res.stdout}\n{res.stderr}"
    m = re.search(r"Submitted job (\d+)", res.stdout)
    assert m, res.stdout
    return m.group(1)


def sbatch(args: list[str], **kw) -> str:
    """``sbatch --parsable ARGS``; returns the job id."""
    res = run(["sbatch", "--parsable", *args], **kw)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def slurm_args(
    d: Path, name: str, *extra: str, overrides: list[str] | None = None, nodes: int = 2
) -> list[str]:
    """``submit.py`` arguments of the tiny job: logs in ``d/slurm``, the run in ``d/run``."""
    return [
        "--slurm", "--nodes", str(nodes), "--job-name", f"{JOB_PREFIX}-{name}",
        "--config", str(DEBUG_CONFIG), "--folder", str(d / "slurm"), *extra,
        f"output_dir={d / 'run'}", *(TINY if overrides is None else overrides),
    ]  # fmt: skip


def task_log(folder: Path, job: str, rank: int = 0) -> str:
    """What task ``rank`` of ``job`` wrote, every run of it (``--open-mode=append``)."""
    return (folder / f"{job}_{rank}_log.out").read_text(errors="replace")


def banners(log: str, job: str) -> list[int]:
    """Restart counts, in log order, of the per-run banner lines of rank 0."""
    return [int(m) for m in re.findall(rf"job {job} restart (\d+) rank 0/", log)]


def resumed_steps(log: str) -> list[int]:
    """The step each run resumed from, in log order."""
    return [int(s) for s in re.findall(r"resumed from step (\d+) ", log)]


def status(folder: Path, job: str) -> str:
    """``submit.py --status JOB --folder FOLDER`` (its output)."""
    st = run([PYTHON, SUBMIT, "--status", job, "--folder", folder])
    assert st.returncode == 0, st.stderr
    return st.stdout


def reason_line(status_text: str) -> str:
    return next(ln for ln in status_text.splitlines() if ln.strip().startswith("reason:"))


def processes(job: str, rank: int, marker: bytes = b"kempnerforge.train") -> list[int]:
    """Pids of ``job``'s processes of ``rank`` whose command line holds ``marker`` (every
    emulated node runs on this host, so /proc shows them all)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        mine = f"SLURM_JOB_ID={job}".encode() in env and f"RANK={rank}".encode() in env
        if mine and marker in cmd:
            out.append(int(d.name))
    return out


def assert_bit_exact(got_path: Path, ref: dict[int, float]) -> None:
    """Every logged line (a step may be logged again after a restart) equals the reference."""
    rows = metrics(got_path)
    assert sorted({r["step"] for r in rows}) == list(range(1, MAX_STEPS + 1)), rows
    bad = [(r["step"], r["loss"], ref[r["step"]]) for r in rows if r["loss"] != ref[r["step"]]]
    assert not bad, f"loss differs from the uninterrupted run at (step, got, want): {bad[:5]}"


def local_command(out: Path) -> list[str]:
    """The tiny job on ``WORLD`` ranks by the local launcher (no SLURM), run in ``out``."""
    return [
        PYTHON, SUBMIT, "--local", "--nodes", "1", "--tasks-per-node", str(WORLD),
        "--config", str(DEBUG_CONFIG), f"output_dir={out}", *TINY,
    ]  # fmt: skip


def reference_losses(out: Path) -> dict[int, float]:
    """An uninterrupted run of the same job and world size, by the local launcher (no SLURM)."""
    res = run(local_command(out), timeout=300, cwd=out.parent)
    assert res.returncode == 0, f"reference run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    rows = metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    return {r["step"]: r["loss"] for r in rows}
