"""``--status JOB`` and ``--wait``: what is known about a job, and one line saying why it is where
it is.

It reads the scheduler's state (``scontrol show job``), the job record, every rank's exit records
and logs (for the training's stop line), and the checkpoint dir (the resume step, the requeue
guard's decisions, and one goodput line from the run ledger). Works for local jobs too: their
job record holds the local launcher's state.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kempnerforge.launch import records
from kempnerforge.launch.progress import resume_step

logger = logging.getLogger(__name__)

PREFIX = records.LOG_PREFIX
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
# Final states the scheduler caused (the tasks did not choose to end), with what they mean.
SCHEDULER_ENDS = {
    "TIMEOUT": "the job ran into its time limit (SLURM never requeues a TIMEOUT: the job must "
    "save and requeue itself when the lead signal arrives)",
    "NODE_FAIL": "a node of the job failed",
    "CANCELLED": "cancelled by a user or an administrator (scancel)",
    "PREEMPTED": "preempted by the scheduler and not requeued",
    "OUT_OF_MEMORY": "a task ran out of memory",
    "BOOT_FAIL": "a node failed to boot",
    "DEADLINE": "the job's deadline passed",
}


def scontrol_job(job_id: str) -> dict[str, str] | None:
    """The job's fields from ``scontrol show job -o`` (None: unknown to slurmctld, or no SLURM)."""
    if shutil.which("scontrol") is None or not re.fullmatch(r"[\d_]+", job_id):
        return None
    try:
        res = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0 or not res.stdout.strip():
        return None
    line = res.stdout.strip().splitlines()[0]
    return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", line))


def find_record(
    job_id: str, info: dict[str, str] | None, folder: str | None = None
) -> dict[str, Any] | None:
    """The job record: in ``folder``, beside the job's output, or under ``./runs``."""
    candidates: list[Path] = []
    if folder:
        candidates.append(records.job_record_path(folder, job_id))
    if info and info.get("StdOut"):
        candidates.append(records.job_record_path(Path(info["StdOut"]).parent, job_id))
    name = f"{records.glob_escape(job_id)}{records.JOB_RECORD_SUFFIX}"
    for pattern in ("runs/*/slurm", "runs/*/local", "runs/slurm", "runs/local"):
        candidates += Path.cwd().glob(f"{pattern}/{name}")
    for c in candidates:
        rec = records.read_json(c)
        if rec is not None:
            return rec
    return None


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def _rank_logs(folder: Path, job_id: str) -> list[tuple[int, Path]]:
    pat = re.compile(rf"^{re.escape(job_id)}_(\d+)_log\.out$")
    out = []
    for p in folder.glob(f"{records.glob_escape(job_id)}_*_log.out"):
        m = pat.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def _crash_policy_of(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The crash decision in an exit record (the SLURM wrapper's or the local launcher's)."""
    pol = rec.get("crash_policy") or (rec.get("decision") or {}).get("crash_policy")
    return pol if isinstance(pol, dict) and pol.get("restart") is not None else None


def status(job_id: str, folder: str | None = None, lines: int = 15) -> int:
    """Print what is known about a job; ends with one ``reason:`` line."""
    from kempnerforge.resilience.requeue import last_decision

    info = scontrol_job(job_id)
    record = find_record(job_id, info, folder)
    if info is None and record is None:
        print(
            f"job {job_id}: unknown to scontrol and no record under ./runs/*/(slurm|local)/ "
            "(pass --folder)",
            file=sys.stderr,
        )
        return 1
    record = record or {}
    out = [f"job {job_id}"]
    sched_reason = None
    if info:
        state = info.get("JobState", "?")
        sched_reason = info.get("Reason")
        restarts = info.get("Restarts", "?")
        out.append(f"  state:          {state} (reason {sched_reason or '?'})")
        out.append(f"  restart count:  {restarts}")
        out.append(
            f"  nodes:          {info.get('NodeList', '?')}  run time {info.get('RunTime', '?')}"
        )
        out.append(f"  exit code:      {info.get('ExitCode', '?')}")
    elif record.get("mode") == "local":
        state = str(record.get("state", "?"))
        restarts = str(record.get("restarts", "?"))
        if state == "RUNNING" and not _pid_alive(record.get("pid")):
            state = "LAUNCHER_GONE"
        out.append(f"  state:          {state} (local launcher pid {record.get('pid')})")
        out.append(f"  restart count:  {restarts}")
        if "exit_code" in record:
            out.append(f"  exit code:      {record['exit_code']}")
    else:
        state, restarts = "UNKNOWN", "?"
        out.append("  state:          no longer known to slurmctld (no accounting DB to ask)")

    ckpt = record.get("checkpoint_dir")
    guard_refused = None
    if ckpt:
        step = resume_step(ckpt)
        out.append(f"  committed step: {step if step is not None else 'none yet'}")
        out.append(f"  checkpoints:    {ckpt}")
        g = last_decision(ckpt)
        if g is not None and str(g.job_id) == job_id:
            out.append(
                f"  self-requeues:  {g.requeues}" + (f"  REFUSED: {g.refused}" if g.refused else "")
            )
            guard_refused = g.refused
        from kempnerforge.goodput import summary_line

        try:
            goodput = summary_line(ckpt, job_id)
        except Exception as e:  # a report must not hide the rest of the status
            goodput = f"cannot read the run ledger: {e}"
        if goodput:
            out.append(f"  goodput:        {goodput}")

    # Logs: one per rank (launcher folder), else the job's own output file.
    log_dir = Path(record["folder"]) if record.get("folder") else None
    rank_logs = _rank_logs(log_dir, job_id) if log_dir else []
    if not rank_logs and info and info.get("StdOut"):
        rank_logs = [(0, Path(info["StdOut"]))]
    stop = None
    for _, p in rank_logs:
        found = records.stop_line(records.last_run(records.tail(p, 2000), job_id))
        stop = stop or found
    if stop:
        out.append(f"  stop line:      {stop}")

    exits = records.read_exit_records(log_dir, job_id) if log_dir else []
    last_restart = max((int(r.get("restart", 0)) for r in exits), default=None)
    crashes = [r for r in exits if r.get("crash") and int(r.get("restart", 0)) == last_restart]
    crash = min(crashes, key=lambda r: float(r.get("time", 0)), default=None)
    policy = None
    if crash is not None:
        exc = crash.get("exception")
        out.append(
            f"  crash:          rank {crash.get('rank')} (restart {crash.get('restart')}) "
            f"{crash.get('outcome')}" + (f": {exc}" if exc else "")
        )
        pol = next(
            (
                pol
                for r in exits
                if int(r.get("restart", 0)) == last_restart and (pol := _crash_policy_of(r))
            ),
            None,
        )
        if pol:
            policy = ("restarted" if pol.get("restart") else "not restarted") + (
                f": {pol.get('reason')}"
            )
            out.append(f"  crash policy:   {policy}")
        out += ["  | " + ln for ln in crash.get("log_tail", [])[-lines:]]

    log = str(rank_logs[0][1]) if rank_logs else record.get("log")
    if log and crash is None:
        out.append(f"  log:            {log}")
        out += ["  | " + ln for ln in records.tail(log, lines)]
    out.append(
        "  reason:         "
        + _reason(state, sched_reason, info, stop, crash, policy, guard_refused, restarts)
    )
    print("\n".join(out))
    return 0


def _reason(
    state: str,
    sched_reason: str | None,
    info: dict[str, str] | None,
    stop: str | None,
    crash: dict[str, Any] | None,
    policy: str | None,
    guard_refused: str | None,
    restarts: str,
) -> str:
    """One line: why the job is where it is."""
    crash_text = None
    if crash is not None:
        exc = crash.get("exception") or next(
            (ln.strip() for ln in reversed(crash.get("log_tail", [])) if ln.strip()), ""
        )
        crash_text = f"crash: rank {crash.get('rank')} {crash.get('outcome')}" + (
            f": {exc}" if exc else ""
        )
        if policy:
            crash_text += f"; {policy}"
    if state not in FINAL_STATES | {"CANCELLED", "LAUNCHER_GONE", "UNKNOWN"}:
        why = f"{state.lower()} (restart {restarts}"
        if sched_reason and sched_reason not in ("None", "(null)"):
            why += f", scheduler reason {sched_reason}"
        why += ")"
        earlier = stop or crash_text
        return why + (f"; the last run ended: {earlier}" if earlier else "")
    if stop:
        return stop + (f"; then {crash_text}" if crash_text else "")
    if state in SCHEDULER_ENDS:
        why = f"{state}: {SCHEDULER_ENDS[state]}"
        if sched_reason and sched_reason not in ("None", "(null)"):
            why += f" (scheduler reason {sched_reason})"
        return why + (f"; {crash_text}" if crash_text else "")
    if crash_text:
        return crash_text
    if guard_refused:
        return f"the requeue guard refused another run: {guard_refused}"
    if state == "COMPLETED":
        return "completed"
    if state == "LAUNCHER_GONE":
        return "the local launcher is gone (killed?) and wrote no end of the job"
    if state == "FAILED":
        code = (info or {}).get("ExitCode", "?")
        return f"FAILED (exit code {code}); no exit record says more: read the log"
    return f"{state}: nothing recorded says more; read the log"


def wait_for(job_id: str, timeout_s: float) -> str:
    """Poll until the job reaches a final state; print each state and restart change."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        info = scontrol_job(job_id)
        if info is None:
            return "UNKNOWN"
        now = (info.get("JobState"), info.get("Restarts"))
        if now != seen:
            print(f"{PREFIX} job {job_id}: {now[0]} (restart count {now[1]})", flush=True)
            seen = now
        if now[0] in FINAL_STATES:
            return str(now[0])
        time.sleep(0.5)
    return "WAIT_TIMEOUT"
