"""Faults beyond preemption on the real dev cluster: each ends the way a user expects.

Nine cases, each with the line it must end with (state, restarts, resumed step, bit-exact losses,
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
================================  =========  ========  ====================================

A node failure is a node set DOWN by the controller (its jobs are requeued, as after a failed
node); a hard loss of a node is the same for the job once the controller notices.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from _slurm_tools import (
    DEBUG_CONFIG,
    PYTHON,
    REPO,
    SUBMIT,
    TINY,
    assert_bit_exact,
    job_info,
    metrics,
    n_metrics,
    run,
    signal_job,
    submit,
    wait_final,
    wait_until,
)

pytestmark = pytest.mark.slurm

FAULT = [*TINY[:-1], "checkpoint.interval=4"]  # committed steps to resume from
LONG = [*FAULT, "train.max_steps=100000"]  # runs into its time limit
_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def _args(tmp_path: Path, name: str, *extra: str, overrides: list[str] | None = None) -> list[str]:
    return [
        "--slurm", "--nodes", "2", "--job-name", f"kftest-{name}", "--config", str(DEBUG_CONFIG),
        "--folder", str(tmp_path / "slurm"), *extra, f"output_dir={tmp_path / 'run'}",
        *(overrides or FAULT),
    ]  # fmt: skip


def _held(args: list[str]) -> list[str]:
    """Submitted on hold: jobs that start together once released, after every submission."""
    return [*args[:1], "--sbatch", "hold", *args[1:]]


def _status(tmp_path: Path, job: str) -> str:
    st = run([PYTHON, SUBMIT, "--status", job, "--folder", tmp_path / "slurm"])
    assert st.returncode == 0, st.stderr
    return st.stdout


def _reason(status: str) -> str:
    return next(ln for ln in status.splitlines() if ln.strip().startswith("reason:"))


def _log(tmp_path: Path, job: str, rank: int = 0) -> str:
    return (tmp_path / "slurm" / f"{job}_{rank}_log.out").read_text(errors="replace")


def _resumed(tmp_path: Path, job: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from step (\d+) ", _log(tmp_path, job))]


def _committed_ok(ckpt: Path) -> int | None:
    from kempnerforge.checkpoint.resolve import find_resumable

    res = find_resumable(ckpt)
    assert res.error is None, res.error
    return res.step


# --------------------------------------------------------------------------- node failure


@pytest.mark.parametrize("which", ["BatchHost", "other"])
def test_node_failure_resumes_bit_exact(slurm_cluster, reference, tmp_path, which):
    job = submit(_args(tmp_path, f"node-{which}"))
    m = tmp_path / "run" / "metrics.jsonl"
    wait_until("6 steps", lambda: n_metrics(m) >= 6, 180, job)
    info = job_info(job)
    nodes = run(["scontrol", "show", "hostnames", info["NodeList"]]).stdout.split()
    node = (
        info["BatchHost"]
        if which == "BatchHost"
        else next(n for n in nodes if n != info["BatchHost"])
    )
    try:
        res = run(["scontrol", "update", f"nodename={node}", "state=down", "reason=kftest"])
        assert res.returncode == 0, res.stderr
        wait_until("the requeue", lambda: int(job_info(job).get("Restarts", 0)) >= 1, 120)
    finally:
        run(["scontrol", "update", f"nodename={node}", "state=resume"])
    final = wait_final(job, 300)
    assert (final["JobState"], final["Restarts"]) == ("COMPLETED", "1"), final
    assert_bit_exact(m, reference)
    resumed = _resumed(tmp_path, job)
    assert len(resumed) == 1 and resumed[0] >= 4, resumed  # the last committed step
    assert "reason=requeued" in _log(tmp_path, job)
    assert "completed" in _reason(_status(tmp_path, job))


# --------------------------------------------------------------------------- the rest, at once


def _token_file(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.save(path, rng.integers(0, 256, size=200_000, dtype=np.uint16))
    return path


def _pids(job: str, rank: int) -> list[int]:
    """This job's training processes of ``rank`` on this host (all emulated nodes share it)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            f"SLURM_JOB_ID={job}".encode() in env
            and f"RANK={rank}".encode() in env
            and b"kempnerforge.train" in cmd
        ):
            out.append(int(d.name))
    return out


def _submit_with_file_size_limit(args: list[str], limit: int = 300_000) -> str:
    """Submit under RLIMIT_FSIZE: SLURM gives the job the submitter's limits, so every write of a
    checkpoint shard past ``limit`` bytes fails (EFBIG), on every rank, as on a full disk."""
    res = run(["prlimit", f"--fsize={limit}", PYTHON, SUBMIT, *args], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return re.search(r"Submitted job (\d+)", res.stdout).group(1)


def test_every_other_fault_ends_as_expected(slurm_cluster, reference, tmp_path):
    """Seven jobs at once, each with its own fault; then each ending is checked."""
    d = {k: tmp_path / k for k in ("cancel", "requeue", "tl", "tl_sbatch", "kill", "save", "data")}
    for p in d.values():
        p.mkdir()
    data = _token_file(tmp_path / "tokens.npy")
    jobs = {  # submitted on hold (submitting takes seconds each), then released together
        "requeue": submit(_held(_args(d["requeue"], "admin-requeue"))),
        "kill": submit(_held(_args(d["kill"], "kill", "--requeue-on-crash"))),
        "data": submit(
            _held(
                _args(
                    d["data"], "data", "--requeue-on-crash",
                    overrides=[*FAULT, f"data.path={data}"],
                )
            )
        ),
        "cancel": submit(_held(_args(d["cancel"], "cancel", overrides=LONG))),
        "tl": submit(
            _held(_args(d["tl"], "tl", "--time", "1", "--signal-lead", "0", overrides=LONG))
        ),
        "save": _submit_with_file_size_limit(_held(_args(d["save"], "save"))),
    }  # fmt: skip
    wrap = (
        f"srun {PYTHON} -u -m kempnerforge.launch.task -- {PYTHON} -u -m kempnerforge.train "
        f"--config {DEBUG_CONFIG} output_dir={d['tl_sbatch'] / 'run'} " + " ".join(LONG)
    )
    res = run(
        ["sbatch", "--parsable", "--hold", "--requeue", "--open-mode=append", "--time=1", "-N",
         "2", "--job-name=kftest-tl-sbatch", f"--output={d['tl_sbatch'] / 'job.out'}", "--wrap",
         wrap],
        cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    jobs["tl_sbatch"] = res.stdout.strip().split(";")[0]
    assert run(["scontrol", "release", ",".join(jobs.values())]).returncode == 0
    m = {k: p / "run" / "metrics.jsonl" for k, p in d.items()}

    def stop(key: str) -> None:  # SIGSTOP: the job waits there for its fault (SLURM: STOPPED)
        signal_job(jobs[key], "STOP")

    def admin_requeue() -> None:
        assert run(["scontrol", "requeue", jobs["requeue"]]).returncode == 0  # CONT + TERM

    def kill_rank0() -> None:
        stop("kill")
        pids = _pids(jobs["kill"], 0)
        assert pids, "rank 0's training process not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        signal_job(jobs["kill"], "CONT")

    def preempt_and_remove_data() -> None:
        data.unlink()  # the running processes keep their mapping; a new run finds no file
        signal_job(jobs["data"], "USR1")  # saves and requeues

    # (job, after how many logged steps, what to do), done as each job gets there
    actions = [
        ("requeue", 6, admin_requeue),
        ("kill", 6, kill_rank0),
        ("cancel", 6, lambda: run(["scancel", jobs["cancel"]])),
        ("data", 6, preempt_and_remove_data),
        ("tl", 3, lambda: stop("tl")),  # frozen until the limit's SIGCONT + SIGTERM
        ("tl_sbatch", 3, lambda: stop("tl_sbatch")),
    ]
    deadline = time.monotonic() + 400
    polls = 0
    while actions:
        assert time.monotonic() < deadline, f"never reached: {actions}"
        for act in list(actions):
            key, steps, do = act
            if n_metrics(m[key]) >= steps:
                do()
                actions.remove(act)
            elif polls % 50 == 49 and job_info(jobs[key]).get("JobState") in _ENDED:
                pytest.fail(f"{key} ended before its fault: {job_info(jobs[key])}")
        polls += 1
        time.sleep(0.05)

    final = {k: wait_final(j, 420) for k, j in jobs.items()}
    line = {k: (v["JobState"], v["Restarts"]) for k, v in final.items()}

    assert line["cancel"] == ("CANCELLED", "0"), final["cancel"]
    _committed_ok(d["cancel"] / "run" / "checkpoints")  # latest intact (the stop step or 4)
    assert "reason=user-cancel" in _reason(_status(d["cancel"], jobs["cancel"]))

    assert line["requeue"] == ("COMPLETED", "1"), final["requeue"]
    assert_bit_exact(m["requeue"], reference)
    assert "reason=requeued" in _log(d["requeue"], jobs["requeue"])

    for key in ("tl", "tl_sbatch"):
        assert line[key] == ("TIMEOUT", "0"), final[key]
    assert "reason=time-limit-no-lead" in _reason(_status(d["tl"], jobs["tl"]))
    assert "reason=time-limit-no-lead" in (d["tl_sbatch"] / "job.out").read_text()

    assert line["kill"] == ("COMPLETED", "1"), final["kill"]
    assert_bit_exact(m["kill"], reference)
    assert _resumed(d["kill"], jobs["kill"]) and _resumed(d["kill"], jobs["kill"])[0] >= 4

    assert line["save"][0] == "FAILED" and line["save"][1] == "0", final["save"]
    reason = _reason(_status(d["save"], jobs["save"]))
    assert "crash: rank" in reason and "CheckpointError" in reason, reason
    assert "File too large" in reason or "RLIMIT_FSIZE" in reason, reason

    assert line["data"] == ("FAILED", "1"), final["data"]
    reason = _reason(_status(d["data"], jobs["data"]))
    assert "FileNotFoundError" in reason and "not restarted" in reason, reason
    assert "no progress" in reason, reason
    assert metrics(m["data"])  # the first run trained


# --------------------------------------------------------------------------- a hung rank

HANG_SCRIPT = """
import sys, time, torch, torch.distributed as dist, torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from kempnerforge.checkpoint import CheckpointManager
from kempnerforge.config import CheckpointConfig
from kempnerforge.resilience.config import ResilienceConfig
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.Linear(8, 8)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
res = ResilienceConfig(hang_timeout_s=float(sys.argv[2]), max_requeues_without_progress=0)
mgr = CheckpointManager(CheckpointConfig(dir=sys.argv[1], interval=4), model, opt, resilience=res)
step, _, _ = mgr.resume()
ddp = DDP(model)
while step < 1000:
    if rank == 1 and step + 1 == 6:
        print("rank 1 blocks inside step 6", flush=True)
        time.sleep(3600)
    ddp(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    step += 1
    time.sleep(0.05)
    if mgr.maybe_save(step):
        sys.exit(mgr.exit_code)
"""
HANG_S = 10.0


def test_hung_rank_on_the_cluster(slurm_cluster, tmp_path):
    """Rank 1 blocks inside step 6 in every run: each run ends within the threshold plus a
    minute with every rank's stacks in the log; the first is requeued (77), the second hangs at
    the same step without progress and the guard stops the job (76, FAILED)."""
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    res = run(
        [PYTHON, SUBMIT, "--slurm", "--nodes", "2", "--job-name", "kftest-hang",
         "--folder", tmp_path / "slurm", "--", PYTHON, script, tmp_path / "ckpt", str(HANG_S)],
        cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    job = re.search(r"Submitted job (\d+)", res.stdout).group(1)
    log1 = tmp_path / "slurm" / f"{job}_1_log.out"

    def blocked(n: int) -> bool:
        return log1.exists() and log1.read_text(errors="replace").count("blocks inside") >= n

    wait_until("rank 1 to block", lambda: blocked(1), 180, job)
    t = time.monotonic()
    wait_until("the requeue", lambda: int(job_info(job).get("Restarts", 0)) >= 1, 200)
    assert time.monotonic() - t < HANG_S + 60
    wait_until("rank 1 to block again", lambda: blocked(2), 180, job)
    t = time.monotonic()
    final = wait_final(job, 200)
    assert time.monotonic() - t < HANG_S + 60
    assert (final["JobState"], final["Restarts"]) == ("FAILED", "1"), final
    assert final["ExitCode"].startswith("76:"), final
    log0 = _log(tmp_path, job)
    assert log0.count("kempnerforge hang: rank=0 no step progress") == 2, log0[-3000:]
    assert "requeue=granted exit=77" in log0 and "requeue=refused exit=76" in log0
    assert log0.count("Thread 0x") >= 2 and log1.read_text().count("Thread 0x") >= 2
    assert "reason" in _status(tmp_path, job)
