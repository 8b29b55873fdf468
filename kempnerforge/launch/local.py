"""Local mode: run a job's nodes x tasks-per-node processes on this host, restarted like a requeue.

Every task is a child of this launcher (no torchrun in between, so no exit code is hidden), in its
own session, so a Ctrl-C in the terminal reaches only the launcher. All tasks are on this host:
``LOCAL_RANK`` is the rank, ``GROUP_RANK`` 0. Signals sent to the launcher are passed to every
task through the :class:`~kempnerforge.launch.signal_relay.SignalRelay`; tasks start with them
ignored, so one that arrives before a task has its handler waits for it.

When every task has exited, the exit codes decide (:mod:`kempnerforge.exit_codes`):

* the launcher was cancelled (SIGTERM or SIGINT): no restart whatever the codes; exit 143 / 130.
  The cancel is passed to the tasks as SIGTERM; a second one kills them at once.
* all 0: done, exit 0.
* any 76 (the requeue guard refused another run): stop, exit 76.
* the rest 0 or restartable (75, 77): start the job again with a new master port, within
  ``--max-requeues``; one line per restart says why.
* a crash (any other code, or killed by a signal): the other tasks get SIGTERM a few seconds
  later, then SIGKILL; the job ends with the crash code, unless ``--requeue-on-crash`` is given
  and the run advanced the resume step (:func:`~kempnerforge.launch.progress.crash_decision`).

A task still running ``grace_s`` after another one exited is ended the same way (a rank hanging
in a collective its peers left). The launcher writes the same job and exit records as a SLURM
job, into its folder, so ``--status local-<id>`` explains a local run too. With a checkpoint dir
(``--checkpoint-dir``, or the training config's), each run's end and each restart also go into
its run ledger (:mod:`kempnerforge.ledger`), for ``kempnerforge report``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kempnerforge import exit_codes, ledger
from kempnerforge.job import JobEnvironment, master_port_for
from kempnerforge.launch import records
from kempnerforge.launch.progress import CrashDecision, crash_decision, resume_step
from kempnerforge.launch.signal_relay import (
    CATCH,
    DEFAULT,
    SignalRelay,
    disposition,
    process_tree,
    signal_name,
)
from kempnerforge.launch.task import (
    OutputPump,
    clean_environment,
    spawn,
    task_environment,
    write_stdout,
)

logger = logging.getLogger(__name__)

PREFIX = "[kempnerforge.launch]"
CRASH_GRACE_S = 3.0  # after a crash, the other tasks may still write their own error
KILL_AFTER_S = 3.0  # SIGTERM -> SIGKILL
_POLL_S = 0.05
_KEEP_LINES = 200  # per task, for the exit record's tail and the exception


@dataclass
class LocalJob:
    """What to run locally and how to treat its exits."""

    command: list[str]
    nodes: int = 1
    tasks_per_node: int = 1
    signals: list[int] = field(default_factory=lambda: [int(signal.SIGUSR1)])
    grace_s: float = 120.0
    max_requeues: int = 0  # restarts allowed in total (0 = no limit)
    requeue_on_crash: bool = False
    checkpoint_dir: Path | None = None
    folder: Path | None = None
    job_id: str = field(default_factory=lambda: f"local-{uuid.uuid4().hex[:8]}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass
class _Task:
    rank: int
    proc: subprocess.Popen
    output: OutputPump
    log: IO[bytes] | None
    returncode: int | None = None
    ended_by: str | None = None  # why the launcher ended it, if it did

    @property
    def lines(self) -> list[str]:
        return list(self.output.lines)


@dataclass
class _Outcome:
    code: int  # the launcher's exit code if it stops here
    restart: bool
    line: str  # the one line that says what happens and why
    action: str
    crash: CrashDecision | None = None


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalLauncher:
    """Runs one :class:`LocalJob` to its end; :meth:`run` returns the launcher's exit code."""

    def __init__(self, job: LocalJob) -> None:
        self.job = job
        self.cancel_sig: int | None = None
        self.cancel_t = 0.0
        self.kill_now = False
        self._notices: deque[tuple[int, bool]] = deque()  # (signal, a second cancel)
        self._out = threading.Lock()
        self._started = time.time()
        self._first_exit_t: float | None = None  # monotonic: the last run's first task exit

    # ------------------------------------------------------------------------- output
    def _emit(self, data: bytes) -> None:
        with self._out:
            write_stdout(data)

    def say(self, msg: str) -> None:
        self._emit(f"{PREFIX} {msg}\n".encode())

    # ------------------------------------------------------------------------- signals
    def _on_signal(self, signum: int) -> int | None:
        """Runs in the signal handler: set flags only; the loop prints."""
        cancel = signum in (signal.SIGTERM, signal.SIGINT)
        self._notices.append((signum, cancel and self.cancel_sig is not None))
        if cancel:
            if self.cancel_sig is not None:
                self.kill_now = True
                return None
            self.cancel_sig = signum
            self.cancel_t = time.monotonic()
            return int(signal.SIGTERM)
        return signum

    def _print_notices(self, ntasks: int) -> None:
        while self._notices:
            sig, again = self._notices.popleft()
            if again:
                self.say(f"got {signal_name(sig)} again: killing the task(s)")
            elif sig in (signal.SIGTERM, signal.SIGINT):
                self.say(
                    f"got {signal_name(sig)}: cancelling; SIGTERM to {ntasks} task(s), no restart "
                    f"(again to kill them at once)"
                )
            else:
                self.say(f"got {signal_name(sig)}: passing it to {ntasks} task(s)")

    # ------------------------------------------------------------------------- one run
    def _port(self, restart: int, previous: int | None) -> int:
        port = master_port_for(self.job.job_id, restart)
        if port == previous or not _bindable(port):
            port = _free_port()
        return port

    def _start(self, restart: int, port: int) -> list[_Task]:
        job = self.job
        base = clean_environment(os.environ, drop_slurm=True)
        tasks = []
        for rank in range(job.world_size):
            place = JobEnvironment(
                launcher="torchrun",
                rank=rank,
                world_size=job.world_size,
                local_rank=rank,
                local_world_size=job.world_size,
                node_rank=0,
                num_nodes=1,
                master_addr="127.0.0.1",
                master_port=port,
                job_id=job.job_id,
                under_slurm=False,
                restart_count=restart,
                hostname=socket.gethostname(),
            )
            log = None
            if job.folder is not None:
                log = open(records.log_path(job.folder, job.job_id, rank), "ab")  # noqa: SIM115
                log.write(
                    f"{records.BANNER_PREFIX}{job.job_id} restart {restart} rank {rank}/"
                    f"{job.world_size} local master 127.0.0.1:{port}: "
                    f"{shlex.join(job.command)}\n".encode()
                )
                log.flush()
            proc = spawn(
                job.command,
                task_environment(place, base),
                [*job.signals, int(signal.SIGTERM)],
                stdin=None if rank == 0 else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            assert proc.stdout is not None
            pump = OutputPump(proc.stdout, self._emit, log, keep=_KEEP_LINES)
            tasks.append(_Task(rank, proc, pump, log))
        return tasks

    def _signal_all(self, tasks: list[_Task], sig: int) -> None:
        for t in tasks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(t.proc.pid, sig)

    def _end(self, tasks: list[_Task]) -> None:
        """SIGTERM to each task's session, or SIGKILL at once where every process of the task
        ignores SIGTERM (as each task starts: SIGTERM would do nothing there)."""
        for t in tasks:
            tree = process_tree(t.proc.pid)
            heeds = any(disposition(pid, signal.SIGTERM) in (CATCH, DEFAULT) for pid in tree)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(t.proc.pid, signal.SIGTERM if heeds else signal.SIGKILL)

    def _supervise(self, tasks: list[_Task]) -> _Task | None:
        """Wait for every task; end the rest after a crash, a hang or a cancel. Returns the
        first task that crashed (by time), if any."""
        crashed: _Task | None = None
        crash_t = first_exit_t = term_t = None
        self._first_exit_t = None
        killed = False
        while True:
            self._print_notices(len(tasks))
            now = time.monotonic()
            for t in tasks:
                if t.returncode is None and (rc := t.proc.poll()) is not None:
                    t.returncode = rc
                    first_exit_t = first_exit_t or now
                    self._first_exit_t = first_exit_t
                    if crashed is None and records.is_crash(rc):
                        crashed, crash_t = t, now
            alive = [t for t in tasks if t.returncode is None]
            if not alive:
                return crashed
            if self.kill_now and not killed:
                self._signal_all(alive, signal.SIGKILL)
                killed = True
            if term_t is None:
                why = self._why_end(now, crashed, crash_t, first_exit_t)
                if why is not None:
                    ranks = ", ".join(str(t.rank) for t in alive)
                    self.say(f"job {self.job.job_id}: {why[0]}: ending rank(s) {ranks}")
                    for t in alive:
                        t.ended_by = why[1]
                    self._end(alive)
                    term_t = now
            elif not killed and now - term_t >= KILL_AFTER_S:
                self._signal_all(alive, signal.SIGKILL)
                killed = True
            time.sleep(_POLL_S)

    def _why_end(
        self,
        now: float,
        crashed: _Task | None,
        crash_t: float | None,
        first_exit_t: float | None,
    ) -> tuple[str, str] | None:
        """(what to print, what the exit record says) when the running tasks must be ended."""
        grace = self.job.grace_s
        if crashed is not None and crash_t is not None and now - crash_t >= CRASH_GRACE_S:
            rc = crashed.returncode if crashed.returncode is not None else -9
            return f"rank {crashed.rank} crashed ({records.code_text(rc)})", "ended: crash"
        if self.cancel_sig is not None and now - self.cancel_t >= grace:
            return f"still running {grace:.0f} s after the cancel", "ended: cancel"
        if first_exit_t is not None and now - first_exit_t >= grace:
            return (
                f"still running {grace:.0f} s after another task exited",
                "ended: hung after another task exited",
            )
        return None

    def _cleanup(self, tasks: list[_Task]) -> None:
        """Nothing of a run outlives it: leftovers of each task's session are killed."""
        self._signal_all(tasks, signal.SIGKILL)
        for t in tasks:
            t.output.join(timeout=5)
            if t.proc.stdout is not None:
                t.proc.stdout.close()
            if t.log is not None:
                t.log.close()

    # ------------------------------------------------------------------------- decisions
    def _decide(
        self,
        restart: int,
        tasks: list[_Task],
        crashed: _Task | None,
        step_before: int | None,
        next_port: int,
    ) -> _Outcome:
        job = self.job
        codes = [t.returncode if t.returncode is not None else -9 for t in tasks]
        head = f"job {job.job_id} restart {restart}: exit codes {codes}"
        again = f"restarting (restart {restart + 1}, master 127.0.0.1:{next_port})"
        if self.cancel_sig is not None:
            return _Outcome(
                128 + self.cancel_sig,
                False,
                f"{head}: cancelled ({signal_name(self.cancel_sig)} to the launcher): "
                "not restarting",
                "cancelled",
            )
        if all(c == exit_codes.OK for c in codes):
            return _Outcome(0, False, f"{head}: done", "done")
        if exit_codes.REFUSED in codes:
            why = "the requeue guard refused another run"
            guard = self._guard_refusal()
            return _Outcome(
                exit_codes.REFUSED,
                False,
                f"{head}: stop: {why}" + (f": {guard}" if guard else " (see the task's log)"),
                "stop",
            )
        if crashed is None:  # every code is 0 or restartable
            guard = self._guard_refusal()
            if guard:
                return _Outcome(
                    exit_codes.REFUSED,
                    False,
                    f"{head}: stop: the requeue guard refused another run: {guard}",
                    "stop",
                )
            if job.max_requeues and restart >= job.max_requeues:
                return _Outcome(
                    exit_codes.REFUSED,
                    False,
                    f"{head}: stop: --max-requeues {job.max_requeues} restart(s) used",
                    "stop",
                )
            return _Outcome(0, True, f"{head}: {again}", "restart")
        rc = crashed.returncode if crashed.returncode is not None else -9
        what = f"rank {crashed.rank} {records.code_text(rc)}"
        if crashed.ended_by:
            what += f", {crashed.ended_by}"
        exc = records.exception_line(crashed.lines)
        if exc:
            what += f": {exc}"
        decision = crash_decision(
            job.requeue_on_crash, job.checkpoint_dir, step_before, restart, job.max_requeues
        )
        if decision.restart:
            return _Outcome(
                0, True, f"{head}: crash: {what}; {again}: {decision.reason}", "restart", decision
            )
        return _Outcome(
            records.shell_code(rc),
            False,
            f"{head}: crash: {what}; not restarting: {decision.reason}",
            "stop",
            decision,
        )

    def _guard_refusal(self) -> str | None:
        """Why the requeue guard refused this job's last request, if it did."""
        if self.job.checkpoint_dir is None:
            return None
        from kempnerforge.resilience.requeue import last_decision

        g = last_decision(self.job.checkpoint_dir)
        if g is not None and g.job_id == self.job.job_id and g.refused:
            return g.refused
        return None

    # ------------------------------------------------------------------------- records
    def _write_job_record(self, state: str, restart: int, **extra: Any) -> None:
        job = self.job
        if job.folder is None:
            return
        records.write_json(
            records.job_record_path(job.folder, job.job_id),
            {
                "job_id": job.job_id,
                "mode": "local",
                "state": state,
                "restarts": restart,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": job.command,
                "world_size": job.world_size,
                "workdir": str(Path.cwd()),
                "folder": str(job.folder),
                "checkpoint_dir": str(job.checkpoint_dir) if job.checkpoint_dir else None,
                "log": str(records.log_path(job.folder, job.job_id, 0)),
                "submitted_at": self._started,
                "updated_at": time.time(),
                **extra,
            },
        )

    def _write_exit_records(self, restart: int, tasks: list[_Task], outcome: _Outcome) -> None:
        if self.job.folder is None:
            return
        decision: dict[str, Any] = {"action": outcome.action, "line": outcome.line}
        if outcome.crash is not None:
            decision["crash_policy"] = outcome.crash.as_dict()
        for t in tasks:
            rec = records.exit_record(
                self.job.job_id,
                restart,
                t.rank,
                t.returncode if t.returncode is not None else -9,
                t.lines,
                decision=decision,
                ended_by=t.ended_by,
            )
            records.write_json(
                records.exit_record_path(self.job.folder, self.job.job_id, restart, t.rank), rec
            )

    def _ledger_run_end(
        self, restart: int, tasks: list[_Task], crashed: _Task | None, outcome: _Outcome
    ) -> str:
        """The run's end in the checkpoint dir's run ledger (nothing without a dir); returns
        the reason written."""
        codes = [t.returncode if t.returncode is not None else -9 for t in tasks]
        where: dict[str, Any] = {}
        if outcome.action == "cancelled":
            reason = ledger.CANCEL
        elif outcome.action == "done":
            reason = ledger.DONE
        elif crashed is not None:
            # a task the launcher ended because it ran on after its peers exited: a hang
            hung = crashed.ended_by is not None and "hung" in crashed.ended_by
            reason = ledger.HANG if hung else ledger.CRASH
            where = {"rank": crashed.rank, "node": socket.gethostname()}
        elif exit_codes.REFUSED in codes:
            reason = ledger.REFUSED
        elif exit_codes.HANG in codes:
            reason = ledger.HANG
        else:
            reason = ledger.PREEMPTION
        ledger.run_end(
            self.job.checkpoint_dir,
            job_id=self.job.job_id,
            restart=restart,
            exit_codes=codes,
            outcome=outcome.action,
            reason=reason,
            **where,
        )
        return reason

    # ------------------------------------------------------------------------- the job
    def run(self) -> int:
        job = self.job
        if job.folder is not None:
            job.folder.mkdir(parents=True, exist_ok=True)
        relay = SignalRelay(forward=True, on_signal=self._on_signal)
        relay.install([*job.signals, int(signal.SIGTERM), int(signal.SIGINT)])
        restart, port = 0, self._port(0, None)
        if job.checkpoint_dir is not None:
            ledger.append(
                job.checkpoint_dir,
                "launch",
                job_id=job.job_id,
                world_size=job.world_size,
                who="local",
            )
        self.say(
            f"job {job.job_id} restart 0: {job.world_size} local task(s), master "
            f"127.0.0.1:{port}: {shlex.join(job.command)}"
        )
        while True:
            self._write_job_record("RUNNING", restart)
            step_before = resume_step(job.checkpoint_dir) if job.checkpoint_dir else None
            tasks = self._start(restart, port)
            relay.set_tasks([t.proc.pid for t in tasks])
            if self.cancel_sig is not None:  # came between two runs: these tasks get it too
                relay.request(int(signal.SIGTERM))
            crashed = self._supervise(tasks)
            relay.set_tasks([])
            self._cleanup(tasks)
            self._print_notices(len(tasks))
            next_port = self._port(restart + 1, port)
            outcome = self._decide(restart, tasks, crashed, step_before, next_port)
            self.say(outcome.line)
            self._write_exit_records(restart, tasks, outcome)
            why = self._ledger_run_end(restart, tasks, crashed, outcome)
            if not outcome.restart or self.cancel_sig is not None:
                state = {"done": "COMPLETED", "cancelled": "CANCELLED"}.get(outcome.action)
                self._write_job_record(
                    state or "FAILED", restart, exit_code=outcome.code, reason=outcome.line
                )
                return outcome.code
            crashed_rank = crashed.rank if crashed is not None else None
            restart, port = restart + 1, next_port
            took = time.monotonic() - self._first_exit_t if self._first_exit_t else None
            ledger.restart(
                job.checkpoint_dir,
                job_id=job.job_id,
                n=restart,
                reason=why,
                rank=crashed_rank,
                node=socket.gethostname() if crashed_rank is not None else None,
                took_s=took,
            )


def run_local(job: LocalJob) -> int:
    return LocalLauncher(job).run()
