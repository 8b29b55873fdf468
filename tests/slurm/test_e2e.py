"""End-to-end on a real SLURM cluster (slurm/dev-cluster): preempt, requeue, resume, bit-exact.

Every job trains the same tiny config on 2 ranks (gloo, CPU) and must log, at every step, the same
loss bits as an uninterrupted run of that config by the local launcher (results must not depend on
the launcher). Preemptions are real: `scancel --signal=USR1`, partition preemption by a job in the
`high` partition, and a 1-minute `--time` limit whose signal SLURM sends itself. The requeue is the
job's own `scontrol requeue` (the dev cluster has no RequeueExit).

Each SLURM case is driven at once with the others (:mod:`_cases`); its test asserts on what the
driver saw.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _cases import Place, case
from _slurm_tools import (
    DEBUG_CONFIG,
    MAX_STEPS,
    PYTHON,
    REPO,
    SUBMIT,
    TINY,
    assert_bit_exact,
    banners,
    job_env,
    limit_from_now,
    local_command,
    metrics,
    n_metrics,
    preempt_at,
    restarts,
    run,
    sbatch,
    signal_job,
    slurm_args,
    submit,
    task_log,
    wait_final,
    wait_until,
)

pytestmark = pytest.mark.slurm


@dataclass(frozen=True)
class Ended:
    """A case's job once it ended: its id, the controller's last word, its directory."""

    job: str
    info: dict[str, str]
    dir: Path
    args: tuple[str, ...] = ()
    other: dict[str, str] | None = None  # a second job of the case, when it has one

    @property
    def metrics(self) -> Path:
        return self.dir / "run" / "metrics.jsonl"

    def log(self, rank: int = 0) -> str:
        return task_log(self.dir / "slurm", self.job, rank)


# --------------------------------------------------------------------------- preempted twice


@case("twice", long=True)
def _twice(p: Place) -> Ended:
    args = slurm_args(p.dir, "twice")
    job = submit(args)
    m = p.dir / "run" / "metrics.jsonl"
    preempt_at(job, m, restart=0, min_new_lines=3)
    preempt_at(job, m, restart=1, min_new_lines=3)
    return Ended(job, wait_final(job), p.dir, tuple(args))


@pytest.mark.slurm_case("twice")
def test_submit_preempted_twice_bit_exact(campaign, reference):
    r = campaign.outcome("twice")
    assert r.info["JobState"] == "COMPLETED", r.info
    assert r.info["Restarts"] == "2", r.info
    assert_bit_exact(r.metrics, reference)

    # The log kept every run (--open-mode=append) and shows the restart count of each.
    log = r.log()
    assert banners(log, r.job) == [0, 1, 2]
    assert log.count("kempnerforge stop: reason=preemption-signal signal=SIGUSR1") == 2

    # --dry-run printed exactly what was submitted.
    dry = run([PYTHON, SUBMIT, *r.args, "--dry-run"])
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == (r.dir / "slurm" / f"{r.job}_submission.sh").read_text()

    # The run ledger, read by job id: three runs, two preemptions, and the time each requeued
    # run waited in the queue, from the controller's SubmitTime/StartTime of each run.
    got = run([PYTHON, "-m", "kempnerforge.cli", "report", r.job, "--folder", r.dir / "slurm",
               "--json"])  # fmt: skip
    assert got.returncode == 0, got.stderr
    rep = json.loads(got.stdout)
    assert [x["restart"] for x in rep["runs"]] == [0, 1, 2], rep["runs"]
    assert rep["faults"]["preemption"]["count"] == 2, rep["faults"]
    assert rep["runs"][1]["parts"].get("queue_wait_s", 0) > 0, rep["runs"][1]
    assert rep["queue_wait_s"] > 0
    assert abs(sum(rep["parts"].values()) - rep["wall_s"]) <= 0.01 * rep["wall_s"]

    st = run([PYTHON, SUBMIT, "--status", r.job])
    assert st.returncode == 0, st.stderr
    assert "COMPLETED" in st.stdout and re.search(r"restart count:\s+2", st.stdout), st.stdout
    assert re.search(rf"committed step:\s+{MAX_STEPS}\b", st.stdout), st.stdout


# --------------------------------------------------------------------------- partition preemption


@case("partition", isolated=True)
def _partition(p: Place) -> Ended:
    job = submit(slurm_args(p.dir, "victim", *p.submit_options()))
    m = p.dir / "run" / "metrics.jsonl"
    wait_until("3 steps", lambda: n_metrics(m) >= 3, 300, job)
    # A job in the higher-priority partition that needs the victim's nodes whole.
    high = sbatch(
        ["-p", "high", "-N", str(len(p.nodes)), f"--nodelist={','.join(p.nodes)}", "--exclusive",
         "--job-name=kftest-high", f"--output={p.dir}/high.out", "--wrap", "sleep 2"]
    )  # fmt: skip
    high_info = wait_final(high, 240)
    return Ended(job, wait_final(job), p.dir, other=high_info)


@pytest.mark.slurm_case("partition")
def test_partition_preemption(campaign, reference):
    r = campaign.outcome("partition")
    assert r.other is not None and r.other["JobState"] == "COMPLETED", r.other
    assert r.info["JobState"] == "COMPLETED", r.info
    assert int(r.info["Restarts"]) >= 1, r.info
    log = r.log()
    # The job's own --signal arrived inside the grace time and the stop step was saved.
    assert "signal=SIGUSR1" in log and "kempnerforge stop: reason=" in log
    assert_bit_exact(r.metrics, reference)


# --------------------------------------------------------------------------- time limit


@case("time-limit", long=True)
def _time_limit(p: Place) -> Ended:
    job = submit(slurm_args(p.dir, "timelimit", "--time", "10", "--signal-lead", "20"))
    m = p.dir / "run" / "metrics.jsonl"
    wait_until("3 steps", lambda: n_metrics(m) >= 3, 300, job)
    signal_job(job, "STOP")
    # At least a minute on: the warning comes 20 s before the limit, or up to 30 s earlier
    # (slurmctld checks limits every 30 s), and must come before the limit itself.
    limit_from_now(job, 60)
    wait_until("the requeue", lambda: restarts(job) >= 1, 400, job)
    # The next run only has to finish: it gets back a limit it cannot run into.
    res = run(["scontrol", "update", f"jobid={job}", "TimeLimit=10"])
    assert res.returncode == 0, res.stderr
    return Ended(job, wait_final(job, 400), p.dir)


@pytest.mark.slurm_case("time-limit")
def test_time_limit_signal(campaign, reference):
    """A time limit with a 20 s lead: SLURM sends USR1 around the lead before the limit; the job
    saves and requeues itself (SLURM never requeues a TIMEOUT). The tasks are frozen with SIGSTOP
    after a few steps so the run cannot finish first, and only then is the limit set, a minute or
    two on (:func:`_slurm_tools.limit_from_now`): the time-limit signal comes with SIGCONT into a
    run that has its handler, however long the start took."""
    r = campaign.outcome("time-limit")
    assert r.info["JobState"] == "COMPLETED", r.info
    assert int(r.info["Restarts"]) >= 1, r.info
    assert "kempnerforge stop: reason=time-limit signal=SIGUSR1" in r.log()
    assert_bit_exact(r.metrics, reference)


# --------------------------------------------------------------------------- sbatch templates

TEMPLATES = {
    # template: sbatch options that fit it onto the dev cluster's nodes (2 pretend GPUs each)
    "cpu.sbatch": [],
    "single-node.sbatch": ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"],
    "multi-node.sbatch": [
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=1",
        "--cpus-per-task=1",
    ],
}


def _template_case(template: str) -> None:
    @case(f"template-{template}")
    def drive(p: Place) -> Ended:
        logs = p.dir / "logs"
        logs.mkdir()
        out = p.dir / "run dir"  # a space: overrides must reach the tasks without word splitting
        job = sbatch(
            [f"--job-name=kftest-{template}", f"--output={logs}/%x-%j.out", *TEMPLATES[template],
             REPO / "slurm" / template, DEBUG_CONFIG, f"output_dir={out}", *TINY],
            cwd=REPO,
        )  # fmt: skip
        preempt_at(job, out / "metrics.jsonl", restart=0, min_new_lines=3)
        return Ended(job, wait_final(job), p.dir)


for _template in TEMPLATES:
    _template_case(_template)


@pytest.mark.slurm_case("template-{template}")
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_sbatch_template(campaign, reference, template):
    r = campaign.outcome(f"template-{template}")
    assert r.info["JobState"] == "COMPLETED", r.info
    assert r.info["Restarts"] == "1", r.info
    assert_bit_exact(r.dir / "run dir" / "metrics.jsonl", reference)
    log = (r.dir / "logs" / f"kftest-{template}-{r.job}.out").read_text()
    assert re.findall(rf"job {r.job} restart (\d+)", log) == ["0", "1"]
    assert "world 2" in log


# --------------------------------------------------------------------------- the requeue guard

GUARD_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from kempnerforge.resilience.config import ResilienceConfig
from kempnerforge.resilience.requeue import exit_code_after_preemption, maybe_requeue
cfg = ResilienceConfig(max_requeues_without_progress=1)
# A job that stops at every start without committing anything new (stuck at step 5).
ok = maybe_requeue(cfg, sys.argv[1], 5)
sys.exit(exit_code_after_preemption(cfg, ok))
"""


@case("guard")
def _guard(p: Place) -> Ended:
    script = p.dir / "stuck.py"
    script.write_text(GUARD_SCRIPT)
    job = sbatch(
        ["--requeue", "--open-mode=append", "--job-name=kftest-stuck", f"--output={p.dir}/stuck.out",
         "--wrap",
         f"echo restart=${{SLURM_RESTART_COUNT:-0}}; exec {PYTHON} {script} {p.dir / 'ckpt'}"]
    )  # fmt: skip
    return Ended(job, wait_final(job, 120), p.dir)


@pytest.mark.slurm_case("guard")
def test_guard_stops_a_job_that_never_progresses(campaign):
    r = campaign.outcome("guard")
    # run 0: requeue (first), run 1: one stall allowed, run 2: refused, exit 76, never again.
    assert r.info["JobState"] == "FAILED", r.info
    assert r.info["Restarts"] == "2", r.info
    assert r.info["ExitCode"].startswith("76:"), r.info
    text = (r.dir / "stuck.out").read_text()
    assert re.findall(r"restart=(\d+)", text) == ["0", "1", "2"]
    assert "requeue REFUSED" in text and "max_requeues_without_progress=1" in text


# --------------------------------------------------------------------------- no SLURM


@pytest.mark.distributed
def test_local_launcher_preempted_bit_exact(reference, tmp_path):
    """No SLURM: the launcher runs 2 workers, passes SIGUSR1 to both, restarts on exit 75."""
    out = tmp_path / "run"
    env = job_env()
    for k in [k for k in env if k.startswith("SLURM_")]:
        del env[k]
    proc = subprocess.Popen(
        local_command(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while n_metrics(out / "metrics.jsonl") < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert re.findall(r"job local-\w+ restart (\d+):", output)[:2] == ["0", "0"]
    assert "restart 1:" in output and "exit codes [75, 75]" in output
    assert_bit_exact(out / "metrics.jsonl", reference)
    assert len(metrics(out / "metrics.jsonl")) == MAX_STEPS


def test_dev_cluster_is_up(slurm_cluster):
    """start.sh left ten nodes that accept jobs: n1..n4 shared (the default partition), n5..n10
    for jobs that need nodes to themselves; and it exported its SLURM_CONF to the tests."""
    res = run(["sinfo", "-h", "-N", "-o", "%N %P %T"])
    rows = [line.split() for line in res.stdout.splitlines()]
    nodes = {n for n, _, _ in rows}
    assert sorted(nodes, key=lambda n: int(n[1:])) == [f"n{i}" for i in range(1, 11)], res.stdout
    by_partition: dict[str, set[str]] = {}
    for n, part, _ in rows:
        by_partition.setdefault(part.rstrip("*"), set()).add(n)
    assert by_partition["debug"] == {"n1", "n2", "n3", "n4"}, res.stdout
    assert by_partition["isolated"] == {f"n{i}" for i in range(5, 11)}, res.stdout
    assert by_partition["high"] == nodes, res.stdout
    assert slurm_cluster.isolated_pairs() == [("n5", "n6"), ("n7", "n8"), ("n9", "n10")]
    assert os.environ["SLURM_CONF"] == slurm_cluster.conf
