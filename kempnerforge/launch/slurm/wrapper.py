"""What runs inside every SLURM task of a submitit job: :class:`SlurmTask`.

The task runs the job's command as a child with a torchrun-compatible environment
(:mod:`~kempnerforge.launch.task`) and owns the preemption signal: submitit's own handler
(checkpoint and requeue on rank 0 from inside the handler, where no collective save can run) is
replaced by the signal relay. The command saves and requeues itself (``scontrol requeue``, behind
the requeue guard) and exits 75; the wrapper then leaves without a result, so submitit does not
call the job finished. Every rank leaves an exit record for ``--status``; with a checkpoint dir,
rank 0 also writes its run's end (and the restart, when the job will run again) into the run
ledger (:mod:`kempnerforge.ledger`).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
from typing import Any

from kempnerforge import exit_codes, ledger
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

PREFIX = records.LOG_PREFIX


def scontrol_requeue(job_id: str) -> tuple[bool, str]:
    """``scontrol requeue JOB``: (done, what happened)."""
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
        if rank == 0 and self.checkpoint_dir is not None:
            self._ledger(place.world_size, job_id, restart, place.hostname, rc, decision, paths)
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

    def _ledger(
        self,
        world_size: int,
        job_id: str,
        restart: int,
        host: str,
        rc: int,
        decision: CrashDecision | None,
        paths: Any,
    ) -> None:
        """Rank 0: ``run_end`` for this run (the other ranks' codes where their exit records
        are already there, else None), and ``restart`` when the job runs again."""
        codes: list[int | None] = [None] * max(1, world_size)
        codes[0] = rc
        for rec in records.read_exit_records(paths.folder, job_id):
            r = rec.get("rank")
            if int(rec.get("restart", -1)) != restart or not isinstance(r, int):
                continue
            if 0 < r < len(codes):
                if isinstance(rec.get("exit_code"), int):
                    codes[r] = rec["exit_code"]
                elif rec.get("signal") in signal.Signals.__members__:
                    codes[r] = -int(signal.Signals[rec["signal"]])
        reason = ledger.reason_of_code(rc)
        if rc == exit_codes.OK:
            outcome = "done"
        elif rc in exit_codes.RESTARTABLE or (decision is not None and decision.restart):
            outcome = "restart"
        else:
            outcome = "stop"
        # rank 0 exited with an error itself (killed by a signal, it may be a peer's crash)
        where = {"rank": 0, "node": host} if reason == ledger.CRASH and rc > 0 else {}
        ledger.run_end(
            self.checkpoint_dir,
            job_id=job_id,
            restart=restart,
            exit_codes=codes,
            outcome=outcome,
            reason=reason,
            **where,
        )
        if outcome == "restart":
            ledger.restart(
                self.checkpoint_dir, job_id=job_id, n=restart + 1, reason=reason, **where
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
