"""examples/own_loop.py, a user's own training script, preempted and resumed bit for bit.

Under the local launcher (1 process, and 2 DDP ranks on gloo) the launcher gets SIGUSR1 twice at
random steps and restarts the job by itself; on the real SLURM dev cluster (2 nodes) the job gets
``scancel --signal=USR1`` and requeues itself. Each time every per-step loss, and the final
weights, BatchNorm buffers and SGD momentum, equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _cases import Place, case  # tests/slurm, on the path through this directory's conftest
from _slurm_tools import job_info, run, signal_job, wait_final, wait_until

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "own_loop.py"
SUBMIT = REPO / "launch" / "submit.py"
STEPS = {1: 48, 2: 24}  # 512 samples, batch 32, 3 epochs, per rank


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "KEMPNERFORGE_"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _losses(out: Path) -> dict[int, list[float]]:
    rows: dict[int, list[float]] = {}
    path = out / "losses.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip().endswith("}"):
                r = json.loads(line)
                rows.setdefault(r["step"], []).append(r["loss"])
    return rows


def _local(out: Path, nproc: int, stops: list[int]) -> str:
    cmd = [sys.executable, str(SUBMIT), "--local", "--tasks-per-node", str(nproc), "--"]
    cmd += [sys.executable, str(EXAMPLE), "--out", str(out)]
    out.mkdir(parents=True)
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )
    try:
        for s in stops:
            deadline = time.monotonic() + 180
            while len(_losses(out)) < s:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, f"step {s} not reached"
                time.sleep(0.02)
            proc.send_signal(signal.SIGUSR1)
            # the next stop only once the launcher has restarted the job
            while len(_losses(out)) <= s + 2 and proc.poll() is None:
                time.sleep(0.02)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    return output


def assert_same_run(got: Path, ref: Path, steps: int) -> None:
    a, b = _losses(ref), _losses(got)
    assert sorted(a) == list(range(1, steps + 1)) and sorted(b) == sorted(a)
    bad = [s for s in a if any(v != a[s][0] for v in b[s])]
    assert not bad, f"losses differ at steps {bad[:8]}"
    fa = torch.load(ref / "final.pt", weights_only=True)
    fb = torch.load(got / "final.pt", weights_only=True)
    assert fa["step"] == fb["step"] == steps
    for k, v in fa["model"].items():  # weights and BatchNorm running stats
        assert torch.equal(v, fb["model"][k]), k
    for k, v in fa["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], fb["optimizer"]["state"][k]["momentum_buffer"])


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [1, 2])
def test_local_launcher_two_preemptions_bit_exact(tmp_path: Path, nproc: int) -> None:
    steps = STEPS[nproc]
    _local(tmp_path / "ref", nproc, [])
    rng = random.Random()
    stops = [rng.randint(2, steps // 2 - 3), rng.randint(steps // 2, steps - 4)]
    output = _local(tmp_path / "pre", nproc, stops)
    restarts = re.findall(r"restart (\d+): exit codes \[([0-9, ]+)\]: restarting", output)
    assert [r[0] for r in restarts] == ["0", "1"], output[-3000:]
    assert all(set(r[1].split(", ")) == {"75"} for r in restarts), restarts
    assert output.count("kempnerforge stop: reason=preemption signal=SIGUSR1") == 2
    assert_same_run(tmp_path / "pre", tmp_path / "ref", steps)


@case("own-loop-usr1")
def _slurm_case(place: Place) -> tuple[str, dict[str, str], Path]:
    """Submitted to 2 nodes, USR1 after 6 steps; the local reference runs while the job does.
    A case of the SLURM campaign (tests/slurm/_cases.py), run at once with the others."""
    out = place.dir / "pre"
    out.mkdir()
    res = run(
        [sys.executable, SUBMIT, "--slurm", "--nodes", "2", "--tasks-per-node", "1",
         "--job-name", "kftest-own", "--folder", place.dir / "slurm", "--",
         sys.executable, EXAMPLE, "--out", out],
        cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    job = re.search(r"Submitted job (\d+)", res.stdout).group(1)
    wait_until("6 steps", lambda: len(_losses(out)) >= 6, 300, job)
    signal_job(job, "USR1")
    _local(place.dir / "ref", 2, [])
    return job, wait_final(job, 400), place.dir


@pytest.mark.slurm
@pytest.mark.slurm_case("own-loop-usr1")
def test_slurm_preempted_with_scancel_usr1_bit_exact(campaign) -> None:
    job, info, d = campaign.outcome("own-loop-usr1")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job_info(job)
    assert_same_run(d / "pre", d / "ref", STEPS[2])
    log = (d / "slurm" / f"{job}_0_log.out").read_text()
    assert "kempnerforge stop: reason=preemption-signal signal=SIGUSR1" in log
    st = run([sys.executable, SUBMIT, "--status", job, "--folder", d / "slurm"])
    assert "reason:         completed" in st.stdout, st.stdout
