"""End-to-end on a real SLURM cluster (slurm/dev-cluster): preempt, requeue, resume, bit-exact.

Every job trains the same tiny config on 2 ranks (gloo, CPU) and must log, at every step, the same
loss bits as an uninterrupted run of that config by the local launcher (results must not depend on
the launcher). Preemptions are real: `scancel --signal=USR1`, partition preemption by a job in the
`high` partition, and a 1-minute `--time` limit whose signal SLURM sends itself. The requeue is the
job's own `scontrol requeue` (the dev cluster has no RequeueExit).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _slurm_tools import (
    DEBUG_CONFIG,
    MAX_STEPS,
    PYTHON,
    REPO,
    SUBMIT,
    TINY,
    assert_bit_exact,
    job_env,
    metrics,
    n_metrics,
    preempt_at,
    run,
    signal_job,
    submit,
    wait_final,
    wait_until,
)

pytestmark = pytest.mark.slurm


def _submit_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "--slurm",
        "--nodes",
        "2",
        "--job-name",
        f"kftest-{name}",
        "--config",
        str(DEBUG_CONFIG),
        "--folder",
        str(tmp_path / "slurm"),
        *extra,
        f"output_dir={tmp_path / 'run'}",
        *TINY,
    ]


def _banners(log: Path, job_id: str) -> list[int]:
    """Restart counts, in log order, of the per-run banner lines of rank 0."""
    text = log.read_text(errors="replace")
    return [int(m) for m in re.findall(rf"job {job_id} restart (\d+) rank 0/", text)]


def test_submit_preempted_twice_bit_exact(slurm_cluster, reference, tmp_path):
    args = _submit_args(tmp_path, "twice")
    job = submit(args)
    m = tmp_path / "run" / "metrics.jsonl"
    preempt_at(job, m, restart=0, min_new_lines=3)
    preempt_at(job, m, restart=1, min_new_lines=3)
    info = wait_final(job)
    assert info["JobState"] == "COMPLETED", info
    assert info["Restarts"] == "2", info
    assert_bit_exact(m, reference)

    # The log kept every run (--open-mode=append) and shows the restart count of each.
    log = tmp_path / "slurm" / f"{job}_0_log.out"
    assert _banners(log, job) == [0, 1, 2]
    assert log.read_text().count("kempnerforge stop: reason=preemption-signal signal=SIGUSR1") == 2

    # --dry-run printed exactly what was submitted.
    dry = run([PYTHON, SUBMIT, *args, "--dry-run"])
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == (tmp_path / "slurm" / f"{job}_submission.sh").read_text()

    st = run([PYTHON, SUBMIT, "--status", job])
    assert st.returncode == 0, st.stderr
    assert "COMPLETED" in st.stdout and re.search(r"restart count:\s+2", st.stdout), st.stdout
    assert re.search(rf"committed step:\s+{MAX_STEPS}\b", st.stdout), st.stdout


def test_partition_preemption(slurm_cluster, reference, tmp_path):
    job = submit(_submit_args(tmp_path, "victim"))
    m = tmp_path / "run" / "metrics.jsonl"
    wait_until("3 steps", lambda: n_metrics(m) >= 3, 180, job)
    # A job in the higher-priority partition that needs every CPU of every node.
    res = run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "high",
            "-N",
            "4",
            "--ntasks-per-node=2",
            "--job-name=kftest-high",
            f"--output={tmp_path}/high.out",
            "--wrap",
            "sleep 2",
        ]
    )
    assert res.returncode == 0, res.stderr
    high = res.stdout.strip().split(";")[0]
    assert wait_final(high, 240)["JobState"] == "COMPLETED"
    info = wait_final(job)
    assert info["JobState"] == "COMPLETED", info
    assert int(info["Restarts"]) >= 1, info
    log = (tmp_path / "slurm" / f"{job}_0_log.out").read_text()
    # The job's own --signal arrived inside the grace time and the stop step was saved.
    assert "signal=SIGUSR1" in log and "kempnerforge stop: reason=" in log
    assert_bit_exact(m, reference)


def test_time_limit_signal(slurm_cluster, reference, tmp_path):
    """`--time 1`: SLURM sends USR1 around `--signal-lead` before the limit; the job saves and
    requeues itself (SLURM never requeues a TIMEOUT). The tasks are frozen with SIGSTOP after a
    few steps so the run cannot finish first; the time-limit signal comes with SIGCONT.

    slurmctld checks time limits periodically and may send the signal up to ~30 s earlier than
    the lead: with a 60 s limit a 30 s lead can fire at start, before the task has a handler
    (it then dies of USR1). A 20 s lead fires no earlier than ~10 s into the job."""
    job = submit(_submit_args(tmp_path, "timelimit", "--time", "1", "--signal-lead", "20"))
    m = tmp_path / "run" / "metrics.jsonl"
    wait_until("3 steps", lambda: n_metrics(m) >= 3, 180, job)
    signal_job(job, "STOP")
    info = wait_final(job, 400)
    assert info["JobState"] == "COMPLETED", info
    assert int(info["Restarts"]) >= 1, info
    assert (
        "kempnerforge stop: reason=time-limit signal=SIGUSR1"
        in (tmp_path / "slurm" / f"{job}_0_log.out").read_text()
    )
    assert_bit_exact(m, reference)


TEMPLATES = {
    # template: sbatch options that fit it onto the dev cluster's nodes (2 CPUs, 2 pretend GPUs)
    "cpu.sbatch": [],
    "single-node.sbatch": ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"],
    "multi-node.sbatch": [
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=1",
        "--cpus-per-task=1",
    ],
}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_sbatch_template(slurm_cluster, reference, tmp_path, template):
    logs = tmp_path / "logs"
    logs.mkdir()
    out = tmp_path / "run dir"  # a space: overrides must reach the tasks without word splitting
    res = run(
        [
            "sbatch",
            "--parsable",
            f"--job-name=kftest-{template}",
            f"--output={logs}/%x-%j.out",
            *TEMPLATES[template],
            REPO / "slurm" / template,
            DEBUG_CONFIG,
            f"output_dir={out}",
            *TINY,
        ],
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    m = out / "metrics.jsonl"
    preempt_at(job, m, restart=0, min_new_lines=3)
    info = wait_final(job)
    assert info["JobState"] == "COMPLETED", info
    assert info["Restarts"] == "1", info
    assert_bit_exact(m, reference)
    log = (logs / f"kftest-{template}-{job}.out").read_text()
    assert re.findall(rf"job {job} restart (\d+)", log) == ["0", "1"]
    assert "world 2" in log


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


def test_guard_stops_a_job_that_never_progresses(slurm_cluster, tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(GUARD_SCRIPT)
    log = tmp_path / "stuck.out"
    res = run(
        [
            "sbatch",
            "--parsable",
            "--requeue",
            "--open-mode=append",
            "--job-name=kftest-stuck",
            f"--output={log}",
            "--wrap",
            f"echo restart=${{SLURM_RESTART_COUNT:-0}}; exec {PYTHON} {script} {tmp_path / 'ckpt'}",
        ]
    )
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    info = wait_final(job, 120)
    # run 0: requeue (first), run 1: one stall allowed, run 2: refused, exit 76, never again.
    assert info["JobState"] == "FAILED", info
    assert info["Restarts"] == "2", info
    assert info["ExitCode"].startswith("76:"), info
    text = log.read_text()
    assert re.findall(r"restart=(\d+)", text) == ["0", "1", "2"]
    assert "requeue REFUSED" in text and "max_requeues_without_progress=1" in text


@pytest.mark.distributed
def test_local_launcher_preempted_bit_exact(reference, tmp_path):
    """No SLURM: the launcher runs 2 workers, passes SIGUSR1 to both, restarts on exit 75."""
    out = tmp_path / "run"
    env = job_env()
    for k in [k for k in env if k.startswith("SLURM_")]:
        del env[k]
    proc = subprocess.Popen(
        [
            PYTHON,
            SUBMIT,
            "--local",
            "--nodes",
            "1",
            "--tasks-per-node",
            "2",
            "--config",
            str(DEBUG_CONFIG),
            f"output_dir={out}",
            *TINY,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
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
    """start.sh left four nodes that accept jobs, and exported its SLURM_CONF to the tests."""
    res = run(["sinfo", "-h", "-N", "-o", "%N %T"])
    nodes = dict(line.split() for line in res.stdout.splitlines())
    assert sorted(nodes) == ["n1", "n2", "n3", "n4"], res.stdout
    assert os.environ["SLURM_CONF"] == slurm_cluster.conf
