"""SLURM mode through submitit: submission, the per-task wrapper, the dry run and ``--status``.

One submitit task per SLURM task. Each runs :class:`SlurmTask`, which runs the job's command as a
child with a torchrun-compatible environment (:mod:`~kempnerforge.launch.task`) and owns the
preemption signal: submitit's own handler (checkpoint and requeue on rank 0 from inside the
handler, where no collective save can run) is replaced by the signal relay. The command saves
and requeues itself (``scontrol requeue``, behind the requeue guard) and exits 75; the wrapper
then leaves without a result, so submitit does not call the job finished.

``--dry-run`` prints the script exactly as submitit writes it (same parameters, same writer).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kempnerforge import exit_codes
from kempnerforge.launch import records
from kempnerforge.launch.progress import CrashDecision, crash_decision, resume_step
from kempnerforge.launch.signal_relay import SignalRelay, signal_numbers
from kempnerforge.launch.task import (
    OutputPump,
    slurm_environment,
    spawn,
    task_environment,
    write_stdout,
)

logger = logging.getLogger(__name__)

PREFIX = "[kempnerforge.launch]"
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


# --------------------------------------------------------------------------- parameters


def slurm_available() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def minutes(spec: str) -> int:
    """SLURM time ([D-]HH:MM:SS, MM:SS, MM, D-HH) -> whole minutes (at least 1)."""
    days = 0
    if "-" in spec:
        d, spec = spec.split("-", 1)
        days = int(d)
        parts = [int(p) for p in spec.split(":")]
        parts += [0] * (3 - len(parts))  # D-HH, D-HH:MM
        h, m, s = parts
    else:
        parts = [int(p) for p in spec.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts
    return max(1, days * 1440 + h * 60 + m + (1 if s else 0))


def sbatch_options(items: list[str]) -> dict[str, Any]:
    """``["nodelist=n[3-4]", "exclusive"]`` -> submitit's additional parameters."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.removeprefix("--").partition("=")
        if not key:
            raise SystemExit(f"error: --sbatch {item!r}: give KEY=VALUE or KEY")
        out[key.replace("-", "_")] = value if sep else True
    return out


def tasks_per_node(args: argparse.Namespace) -> int:
    return args.tasks_per_node or args.gpus_per_node or 1


def _comment(text: str) -> str:
    """One script line, whatever ``text`` holds: a newline must not end the comment."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def slurm_parameters(args: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    """The submitit SlurmExecutor parameters (one place, used by submit and dry-run)."""
    params: dict[str, Any] = {
        "job_name": args.job_name,
        "time": minutes(args.time),
        "nodes": args.nodes,
        "ntasks_per_node": tasks_per_node(args),
        "signal_delay_s": args.signal_lead,
        "stderr_to_stdout": True,
        "setup": [
            # What each task runs lives in the pickled task; this line shows it to a reader.
            _comment(f"# every task runs: {shlex.join(command)}"),
            # Read by submitit at import in the task: its handler must sit on our signal, not
            # on USR2 (whose default action would kill the task), and is replaced by ours.
            f"export SUBMITIT_PREEMPT_SIGNAL={args.signal.removeprefix('SIG')}",
            # Read by the training side to tell a time-limit warning from a preemption signal.
            f"export KEMPNERFORGE_SIGNAL_LEAD={args.signal_lead}",
        ],
        "additional_parameters": {"requeue": True, **sbatch_options(args.sbatch)},
    }
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    for key in ("partition", "account", "qos"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    return params


def set_preempt_env(sig: str) -> None:
    """submitit reads SUBMITIT_PREEMPT_SIGNAL once, at import: set it before the first import."""
    name = sig.removeprefix("SIG")
    if "submitit" in sys.modules and os.environ.get("SUBMITIT_PREEMPT_SIGNAL") != name:
        logger.warning("submitit was imported before SUBMITIT_PREEMPT_SIGNAL=%s was set", name)
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = name


def sbatch_script(args: argparse.Namespace, folder: Path, command: list[str]) -> str:
    """Exactly the script submitit will submit for ``args`` (``--dry-run``)."""
    set_preempt_env(args.signal)
    from submitit.slurm import slurm as sslurm

    run = " ".join(
        [shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))]
    )
    return sslurm._make_sbatch_string(command=run, folder=folder, **slurm_parameters(args, command))


def submit(
    args: argparse.Namespace,
    command: list[str],
    folder: Path,
    checkpoint_dir: Path | None,
    **record: Any,
) -> str:
    """Submit the job; write its job record next to the logs; return the job id."""
    set_preempt_env(args.signal)
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        **{f"slurm_{k}": v for k, v in slurm_parameters(args, command).items()}
    )
    task = SlurmTask(
        command,
        [args.signal],
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        requeue_on_crash=args.requeue_on_crash,
        max_requeues=args.max_requeues or 0,
    )
    job = executor.submit(task)
    records.write_json(
        records.job_record_path(folder, job.job_id),
        {
            "job_id": job.job_id,
            "mode": "slurm",
            "command": command,
            "workdir": str(Path.cwd()),
            "folder": str(folder),
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
            "log": str(records.log_path(folder, job.job_id, 0)),
            "world_size": args.nodes * tasks_per_node(args),
            "requeue_on_crash": args.requeue_on_crash,
            "max_requeues": args.max_requeues or 0,
            "submitted_at": time.time(),
            **record,
        },
    )
    return str(job.job_id)


# --------------------------------------------------------------------------- the task


def scontrol_requeue(job_id: str) -> tuple[bool, str]:
    exe = shutil.which("scontrol")
    if exe is None:
        return False, "scontrol is not on PATH"
    try:
        res = subprocess.run([exe, "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    if res.returncode != 0:
        return False, (res.stderr or res.stdout).strip() or f"exit {res.returncode}"
    return True, "requeued"


class SlurmTask:
    """What submitit runs in every SLURM task: the job's command, as a child process.

    A child (not an in-process call) so the command sees exactly what it sees under torchrun or
    locally: results must not depend on the launcher. Exits: 0 -> a result; 75/76/77 -> leave
    without a result (``os._exit``; the command already requeued itself when it wanted to);
    anything else -> an exit record with the crash and a failed task. With
    ``requeue_on_crash``, rank 0 requeues the job after a crash if the run advanced the resume
    step under ``checkpoint_dir`` and the restarts are within ``max_requeues``.
    """

    def __init__(
        self,
        command: list[str],
        signals: list[str],
        checkpoint_dir: str | None = None,
        requeue_on_crash: bool = False,
        max_requeues: int = 0,
    ) -> None:
        self.command = list(command)
        self.signals = list(signals)
        self.checkpoint_dir = checkpoint_dir
        self.requeue_on_crash = requeue_on_crash
        self.max_requeues = max_requeues

    def __call__(self) -> dict[str, Any]:
        import submitit

        sigs = signal_numbers([*self.signals, "SIGTERM"])
        # SLURM signals every process of the step: the relay only holds a signal for a child
        # that has no handler yet. Installed over submitit's own handlers.
        relay = SignalRelay(forward=False)
        relay.install(sigs)

        place = slurm_environment()
        paths = submitit.JobEnvironment().paths
        job_id, restart, rank = place.job_id, place.restart_count, place.rank
        judge = self.requeue_on_crash and rank == 0 and self.checkpoint_dir is not None
        step_before = resume_step(self.checkpoint_dir) if judge and self.checkpoint_dir else None
        env = task_environment(place, os.environ)
        print(
            f"{records.BANNER_PREFIX}{job_id} restart {restart} rank {rank}/{place.world_size} "
            f"node {place.node_rank} ({place.hostname}) master "
            f"{place.master_addr}:{place.master_port}: {shlex.join(self.command)}",
            flush=True,
        )
        lines: list[str] = []
        try:
            child = spawn(self.command, env, sigs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except OSError as e:
            print(f"{PREFIX} cannot start {self.command[0]!r}: {e}", flush=True)
            rc = 127
        else:
            relay.watch(child.pid)
            assert child.stdout is not None
            output = OutputPump(child.stdout, write_stdout)
            rc = child.wait()
            lines = output.join(timeout=5)
        print(
            f"{PREFIX} job {job_id} restart {restart} rank {rank}: command ended: "
            f"{records.describe_exit(rc)}",
            flush=True,
        )
        extra: dict[str, Any] = {}
        decision: CrashDecision | None = None
        if records.is_crash(rc):
            if rank == 0:
                decision = self._crash_policy(job_id, restart, step_before)
                extra["crash_policy"] = decision.as_dict()
            elif self.requeue_on_crash:
                extra["crash_policy"] = {"restart": None, "reason": "rank 0 decides"}
        records.write_json(
            records.exit_record_path(paths.folder, job_id, restart, rank),
            records.exit_record(job_id, restart, rank, rc, lines, **extra),
        )
        if rc == exit_codes.OK:
            return {"job_id": job_id, "restart_count": restart, "rank": rank}
        if rc in exit_codes.RESTARTABLE or rc == exit_codes.REFUSED:
            os._exit(rc)  # no result: the job runs again (75, 77) or was stopped (76)
        if decision is not None and decision.restart:
            os._exit(records.shell_code(rc))  # requeued: no result either
        raise RuntimeError(
            f"command exited with {records.describe_exit(rc)} (job {job_id}, rank {rank}, "
            f"restart {restart})"
        )

    def _crash_policy(self, job_id: str, restart: int, step_before: int | None) -> CrashDecision:
        decision = crash_decision(
            self.requeue_on_crash, self.checkpoint_dir, step_before, restart, self.max_requeues
        )
        if decision.restart:
            ok, msg = scontrol_requeue(job_id)
            if not ok:
                decision = CrashDecision(
                    False,
                    f"{decision.reason}, but `scontrol requeue {job_id}` failed: {msg}",
                    decision.step_before,
                    decision.step_after,
                )
        if self.requeue_on_crash:
            verb = "requeued" if decision.restart else "not requeued"
            print(f"{PREFIX} job {job_id} restart {restart}: crash: {verb}: {decision.reason}")
        return decision


# --------------------------------------------------------------------------- status


def scontrol_job(job_id: str) -> dict[str, str] | None:
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
