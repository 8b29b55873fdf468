"""Faults beyond preemption on the real dev cluster: each ends the way a user expects.

Ten cases, each with the line it must end with (state, restarts, resumed step, bit-exact losses,
the reason ``--status`` gives):

================================  =========  ========  ====================================
case                              state      restarts  reason (``--status``)
================================  =========  ========  ====================================
node failure, the batch host      COMPLETED  1         requeued by the cluster, bit-exact
node failure, the other node      COMPLETED  1         requeued by the cluster, bit-exact
user cancel (``scancel``)         CANCELLED  0         user-cancel; ``latest`` intact
admin ``scontrol requeue``        COMPLETED  1         requeued, bit-exact
time limit, no lead (submit.py)   TIMEOUT    0         time-limit-no-lead
time limit, no lead (sbatch)      TIMEOUT    0         time-limit-no-lead
SIGKILL of rank 0                 COMPLETED  1         crash restarted on progress, bit-exact
a save failing on every rank      FAILED     0         crash: rank N CheckpointError (EFBIG)
a run that fails on resume        FAILED     1         crash: FileNotFoundError, not restarted
a hung rank                       FAILED     1         hang: requeued once, then refused (76)
================================  =========  ========  ====================================

A node failure is a node set DOWN by the controller (its jobs are requeued, as after a failed
node); a hard loss of a node is the same for the job once the controller notices. Each case is
driven at once with the others (:mod:`_cases`), its fault injected by its own thread as soon as
its job has logged enough steps; the node failures run on nodes of their own.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from _cases import Place, case
from _slurm_tools import (
    DEBUG_CONFIG,
    MAX_STEPS,
    PYTHON,
    REPO,
    TINY,
    assert_bit_exact,
    job_info,
    job_state,
    limit_from_now,
    metrics,
    n_metrics,
    processes,
    reason_line,
    restarts,
    resumed_steps,
    run,
    sbatch,
    signal_job,
    slurm_args,
    status,
    submit,
    task_log,
    wait_final,
    wait_until,
)
from helpers import hang_script

pytestmark = pytest.mark.slurm

FAULT = [*TINY[:-1], "checkpoint.interval=4"]  # committed steps to resume from
LONG = [*FAULT, "train.max_steps=100000"]  # runs into its time limit


@dataclass
class Faulted:
    """A case's job once it ended: its id, the controller's last word, where it ran."""

    job: str
    final: dict[str, str]
    dir: Path
    seen: dict[str, int] = field(default_factory=dict)  # what the driver saw on the way

    @property
    def line(self) -> tuple[str, str]:
        return self.final["JobState"], self.final["Restarts"]

    @property
    def metrics(self) -> Path:
        return self.dir / "run" / "metrics.jsonl"

    def log(self, rank: int = 0) -> str:
        return task_log(self.dir / "slurm", self.job, rank)

    def reason(self) -> str:
        return reason_line(status(self.dir / "slurm", self.job))


def _submitted(p: Place, name: str, *extra: str, overrides: list[str] | None = None) -> str:
    return submit(
        slurm_args(p.dir, name, *p.submit_options(), *extra, overrides=overrides or FAULT)
    )


def _at_steps(job: str, p: Place, steps: int) -> None:
    m = p.dir / "run" / "metrics.jsonl"
    wait_until(f"{steps} steps", lambda: n_metrics(m) >= steps, 300, job)


# --------------------------------------------------------------------------- node failure


def _node_failure_case(which: str) -> None:
    @case(f"node-{which}", isolated=True)
    def drive(p: Place) -> Faulted:
        job = _submitted(p, f"node-{which}")
        _at_steps(job, p, 6)
        info = job_info(job)
        nodes = run(["scontrol", "show", "hostnames", info["NodeList"]]).stdout.split()
        batch = info["BatchHost"]
        node = batch if which == "BatchHost" else next(n for n in nodes if n != batch)
        try:
            res = run(["scontrol", "update", f"nodename={node}", "state=down", "reason=kftest"])
            assert res.returncode == 0, res.stderr
            wait_until("the requeue", lambda: restarts(job) >= 1, 120)
        finally:
            run(["scontrol", "update", f"nodename={node}", "state=resume"])
        return Faulted(job, wait_final(job, 300), p.dir)


for _which in ("BatchHost", "other"):
    _node_failure_case(_which)


@pytest.mark.slurm_case("node-{which}")
@pytest.mark.parametrize("which", ["BatchHost", "other"])
def test_node_failure_resumes_bit_exact(campaign, reference, which):
    r = campaign.outcome(f"node-{which}")
    assert r.line == ("COMPLETED", "1"), r.final
    assert_bit_exact(r.metrics, reference)
    resumed = resumed_steps(r.log())
    assert len(resumed) == 1 and resumed[0] >= 4, resumed  # the last committed step
    assert "reason=requeued" in r.log()
    assert "completed" in r.reason()


# --------------------------------------------------------------------------- user cancel


@case("cancel")
def _cancel(p: Place) -> Faulted:
    job = _submitted(p, "cancel", overrides=LONG)
    _at_steps(job, p, 6)
    run(["scancel", job])
    return Faulted(job, wait_final(job, 420), p.dir)


@pytest.mark.slurm_case("cancel")
def test_user_cancel_keeps_latest(campaign):
    from kempnerforge.checkpoint.resolve import find_resumable

    r = campaign.outcome("cancel")
    assert r.line == ("CANCELLED", "0"), r.final
    res = find_resumable(r.dir / "run" / "checkpoints")  # latest intact (the stop step or 4)
    assert res.error is None, res.error
    assert "reason=user-cancel" in r.reason()


# --------------------------------------------------------------------------- admin requeue


@case("admin-requeue")
def _admin_requeue(p: Place) -> Faulted:
    job = _submitted(p, "admin-requeue")
    _at_steps(job, p, 6)
    # Frozen first, so that the requeue lands inside a training step: one that comes after the
    # last step (24 tiny steps take about a second) finds nothing to stop, and SLURM then only
    # runs the finished job again, which resumes at its last step and ends.
    signal_job(job, "STOP")
    frozen_at = n_metrics(p.dir / "run" / "metrics.jsonl")
    assert run(["scontrol", "requeue", job]).returncode == 0  # CONT + TERM
    return Faulted(job, wait_final(job, 420), p.dir, {"frozen_at": frozen_at})


@pytest.mark.slurm_case("admin-requeue")
def test_admin_requeue_resumes_bit_exact(campaign, reference):
    r = campaign.outcome("admin-requeue")
    assert r.seen["frozen_at"] < MAX_STEPS, r.seen  # the requeue came mid-run
    assert r.line == ("COMPLETED", "1"), r.final
    assert_bit_exact(r.metrics, reference)
    assert "reason=requeued" in r.log()
    resumed = resumed_steps(r.log())  # from the step the stop saved, before the last
    assert len(resumed) == 1 and r.seen["frozen_at"] <= resumed[0] < MAX_STEPS, resumed


# --------------------------------------------------------------------------- time limit, no lead


def _freeze_then_limit(job: str, p: Place) -> None:
    """Frozen after 3 steps until the limit's SIGCONT + SIGTERM; the limit is set only then, so
    that the start (however long it takes on a busy host) is over when it falls."""
    _at_steps(job, p, 3)
    signal_job(job, "STOP")
    limit_from_now(job, 5)


@case("time-limit-no-lead", long=True)
def _time_limit_no_lead(p: Place) -> Faulted:
    job = _submitted(p, "tl", "--time", "10", "--signal-lead", "0", overrides=LONG)
    _freeze_then_limit(job, p)
    return Faulted(job, wait_final(job, 420), p.dir)


@case("time-limit-no-lead-sbatch", long=True)
def _time_limit_no_lead_sbatch(p: Place) -> Faulted:
    wrap = (
        f"srun {PYTHON} -u -m kempnerforge.launch.task -- {PYTHON} -u -m kempnerforge.train "
        f"--config {DEBUG_CONFIG} output_dir={p.dir / 'run'} " + " ".join(LONG)
    )
    job = sbatch(
        ["--requeue", "--open-mode=append", "--time=10", "-N", "2", "--job-name=kftest-tl-sbatch",
         f"--output={p.dir / 'job.out'}", "--wrap", wrap],
        cwd=REPO,
    )  # fmt: skip
    _freeze_then_limit(job, p)
    return Faulted(job, wait_final(job, 420), p.dir)


@pytest.mark.slurm_case("time-limit-no-lead")
@pytest.mark.slurm_case("time-limit-no-lead-sbatch")
def test_time_limit_without_lead_ends_timeout(campaign):
    r = campaign.outcome("time-limit-no-lead")
    s = campaign.outcome("time-limit-no-lead-sbatch")
    for got in (r, s):
        assert got.line == ("TIMEOUT", "0"), got.final
    assert "reason=time-limit-no-lead" in r.reason()
    assert "reason=time-limit-no-lead" in (s.dir / "job.out").read_text()


# --------------------------------------------------------------------------- SIGKILL of rank 0


@case("kill")
def _kill(p: Place) -> Faulted:
    job = _submitted(p, "kill", "--requeue-on-crash")
    _at_steps(job, p, 6)
    signal_job(job, "STOP")  # SIGSTOP: rank 0 is killed where it stands (SLURM: STOPPED)
    pids = processes(job, 0)
    assert pids, "rank 0's training process not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    signal_job(job, "CONT")
    return Faulted(job, wait_final(job, 420), p.dir)


@pytest.mark.slurm_case("kill")
def test_sigkill_of_rank0_restarts_bit_exact(campaign, reference):
    r = campaign.outcome("kill")
    assert r.line == ("COMPLETED", "1"), r.final
    assert_bit_exact(r.metrics, reference)
    resumed = resumed_steps(r.log())
    assert resumed and resumed[0] >= 4, resumed


# --------------------------------------------------------------------------- a failing save


@case("save")
def _save(p: Place) -> Faulted:
    # Submitted under RLIMIT_FSIZE: SLURM gives the job the submitter's limits, so every write
    # of a checkpoint shard past 300 kB fails (EFBIG), on every rank, as on a full disk.
    job = submit(slurm_args(p.dir, "save", overrides=FAULT), prefix=["prlimit", "--fsize=300000"])
    return Faulted(job, wait_final(job, 420), p.dir)


@pytest.mark.slurm_case("save")
def test_a_failing_save_fails_the_job(campaign):
    r = campaign.outcome("save")
    assert r.line[0] == "FAILED" and r.line[1] == "0", r.final
    reason = r.reason()
    assert "crash: rank" in reason and "CheckpointError" in reason, reason
    assert "File too large" in reason or "RLIMIT_FSIZE" in reason, reason


# --------------------------------------------------------------------------- data gone on resume


@case("data")
def _data(p: Place) -> Faulted:
    data = p.dir / "tokens.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, size=200_000, dtype=np.uint16))
    job = _submitted(p, "data", "--requeue-on-crash", overrides=[*FAULT, f"data.path={data}"])
    _at_steps(job, p, 6)
    data.unlink()  # the running processes keep their mapping; a new run finds no file
    signal_job(job, "USR1")  # saves and requeues
    return Faulted(job, wait_final(job, 420), p.dir)


@pytest.mark.slurm_case("data")
def test_a_run_that_fails_on_resume_is_not_restarted(campaign):
    r = campaign.outcome("data")
    assert r.line == ("FAILED", "1"), r.final
    reason = r.reason()
    assert "FileNotFoundError" in reason and "not restarted" in reason, reason
    assert "no progress" in reason, reason
    assert metrics(r.metrics)  # the first run trained


# --------------------------------------------------------------------------- a hung rank

HANG_S = 10.0


@case("hang", long=True)
def _hang(p: Place) -> Faulted:
    """Rank 1 blocks inside step 6 in every run; the times from each block to the run's end."""
    command = hang_script.command(
        p.dir / "ckpt", HANG_S, steps=1000, max_requeues_without_progress=0, step_sleep_s=0.05
    )
    job = submit(["--slurm", "--nodes", "2", "--job-name", "kftest-hang", "--folder",
                  str(p.dir / "slurm"), "--", PYTHON, *command])  # fmt: skip
    log1 = p.dir / "slurm" / f"{job}_1_log.out"

    def blocked(n: int) -> bool:
        return log1.exists() and log1.read_text(errors="replace").count("blocks inside") >= n

    wait_until("rank 1 to block", lambda: blocked(1), 300, job)
    t = time.monotonic()
    wait_until("the requeue", lambda: int(job_state(job).get("Restarts", 0)) >= 1, 200)
    to_requeue = time.monotonic() - t
    wait_until("rank 1 to block again", lambda: blocked(2), 300, job)
    t = time.monotonic()
    final = wait_final(job, 200)
    return Faulted(job, final, p.dir, {"to_requeue": to_requeue, "to_end": time.monotonic() - t})


@pytest.mark.slurm_case("hang")
def test_hung_rank_on_the_cluster(campaign):
    """Rank 1 blocks inside step 6 in every run: each run ends within the threshold plus a
    minute with every rank's stacks in the log; the first is requeued (77), the second hangs at
    the same step without progress and the guard stops the job (76, FAILED)."""
    r = campaign.outcome("hang")
    assert r.seen["to_requeue"] < HANG_S + 60, r.seen
    assert r.seen["to_end"] < HANG_S + 60, r.seen
    assert r.line == ("FAILED", "1"), r.final
    assert r.final["ExitCode"].startswith("76:"), r.final
    log0, log1 = r.log(0), r.log(1)
    assert log0.count("kempnerforge hang: rank=0 no step progress") == 2, log0[-3000:]
    assert "requeue=granted exit=77" in log0 and "requeue=refused exit=76" in log0
    assert log0.count("Thread 0x") >= 2 and log1.count("Thread 0x") >= 2
    assert "reason" in status(r.dir / "slurm", r.job)
