"""Helpers for the SLURM end-to-end tests: submit, wait, signal, read metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SUBMIT = REPO / "launch" / "submit.py"
DEBUG_CONFIG = REPO / "configs" / "debug.yaml"
JOB_PREFIX = "kftest"

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
    res = run(["scontrol", "show", "job", "-o", job_id], timeout=30)
    assert res.returncode == 0, f"scontrol show job {job_id}: {res.stderr}"
    return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", res.stdout))


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
        if job_id is not None and job_info(job_id).get("JobState") in FINAL and not pred():
            raise AssertionError(f"job {job_id} ended ({job_info(job_id)}) before: {what}")
        time.sleep(poll)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for: {what}"
        + (f"; job {job_info(job_id)}" if job_id else "")
    )


def wait_final(job_id: str, timeout: float = 300) -> dict[str, str]:
    wait_until(f"job {job_id} to end", lambda: job_info(job_id).get("JobState") in FINAL, timeout)
    return job_info(job_id)


def restarts(job_id: str) -> int:
    return int(job_info(job_id).get("Restarts", "0"))


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
    job_id: str, metrics_path: Path, restart: int, min_new_lines: int, timeout: float = 180
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


def submit(args: list[str]) -> str:
    res = run([PYTHON, SUBMIT, *args], timeout=120)
    assert res.returncode == 0, f"submit.py failed:\n{res.stdout}\n{res.stderr}"
    m = re.search(r"Submitted job (\d+)", res.stdout)
    assert m, res.stdout
    return m.group(1)


def assert_bit_exact(got_path: Path, ref: dict[int, float]) -> None:
    """Every logged line (a step may be logged again after a restart) equals the reference."""
    rows = metrics(got_path)
    assert sorted({r["step"] for r in rows}) == list(range(1, MAX_STEPS + 1)), rows
    bad = [(r["step"], r["loss"], ref[r["step"]]) for r in rows if r["loss"] != ref[r["step"]]]
    assert not bad, f"loss differs from the uninterrupted run at (step, got, want): {bad[:5]}"


def reference_losses(out: Path) -> dict[int, float]:
    """An uninterrupted run of the same job and world size, by the local launcher (no SLURM)."""
    res = run(
        [
            PYTHON,
            SUBMIT,
            "--local",
            "--nodes",
            "1",
            "--tasks-per-node",
            str(WORLD),
            "--config",
            DEBUG_CONFIG,
            f"output_dir={out}",
            *TINY,
        ],
        timeout=300,
        cwd=out.parent,
    )
    assert res.returncode == 0, f"reference run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    rows = metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    return {r["step"]: r["loss"] for r in rows}
