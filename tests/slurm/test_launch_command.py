"""A user's own command on the real dev cluster: through ``--slurm -- COMMAND`` (submitit) and
through an sbatch template with ``KF_COMMAND``. Each task's environment, the exit records, the
crash policy (``--requeue-on-crash``) and ``--status`` are checked on real jobs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _slurm_tools import PYTHON, REPO, SUBMIT, run, submit, wait_final

from kempnerforge.job import master_port_for

pytestmark = pytest.mark.slurm

WORKER = r"""
import json, os, sys, time
from pathlib import Path

out = Path(sys.argv[1])
mode = sys.argv[2]
rank = int(os.environ["RANK"])
restart = int(os.environ["KEMPNERFORGE_RESTART_COUNT"])
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
        "MASTER_PORT", "KEMPNERFORGE_JOB_ID", "KEMPNERFORGE_RESTART_COUNT", "NCCL_NVLS_ENABLE"]
(out / f"env_{restart}_{rank}.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
if mode == "crash_after_progress" and rank == 0:
    if restart == 0:  # a committed-looking checkpoint: progress during run 0 only
        d = out / "ckpt" / "step_10"
        d.mkdir(parents=True)
        (d / ".metadata").write_bytes(b"")
        (d / "train_state").mkdir()
        (d / "train_state" / "rank_00000.pt").write_bytes(b"")
        (d / "metadata.json").write_text(json.dumps({"step": 10}))
        (out / "ckpt" / "latest").symlink_to("step_10")
    raise ValueError(f"boom in run {restart}")
time.sleep(0.5)
"""


def _worker(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path / "worker.py", out


def _envs(out: Path, restart: int) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"env_{restart}_*.json"))]


def test_command_env_and_exit_records(slurm_cluster, tmp_path):
    worker, out = _worker(tmp_path)
    folder = tmp_path / "slurm"
    job = submit(
        [
            "--slurm",
            "--nodes",
            "2",
            "--job-name",
            "kftest-cmd",
            "--folder",
            str(folder),
            "--",
            PYTHON,
            str(worker),
            str(out),
            "ok",
        ]
    )
    info = wait_final(job, 180)
    assert info["JobState"] == "COMPLETED", info
    seen = _envs(out, 0)
    assert [e["RANK"] for e in seen] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in seen} == {"2"}
    assert [e["GROUP_RANK"] for e in seen] == ["0", "1"]
    assert {(e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) for e in seen} == {("0", "1")}
    assert {e["MASTER_ADDR"] for e in seen} == {"n1"}
    assert {e["MASTER_PORT"] for e in seen} == {str(master_port_for(job, 0))}
    assert {e["KEMPNERFORGE_JOB_ID"] for e in seen} == {job}
    assert {e["KEMPNERFORGE_RESTART_COUNT"] for e in seen} == {"0"}
    assert {e["NCCL_NVLS_ENABLE"] for e in seen} == {"0"}
    for rank in (0, 1):
        rec = json.loads((folder / f"{job}_0_{rank}_exit.json").read_text())
        assert (rec["rank"], rec["restart"], rec["exit_code"], rec["crash"]) == (rank, 0, 0, False)
    st = run([PYTHON, SUBMIT, "--status", job])
    assert st.returncode == 0, st.stderr
    assert st.stdout.rstrip().splitlines()[-1].split() == ["reason:", "completed"], st.stdout


def test_requeue_on_crash_only_after_progress(slurm_cluster, tmp_path):
    worker, out = _worker(tmp_path)
    folder = tmp_path / "slurm"
    job = submit(
        [
            "--slurm",
            "--nodes",
            "2",
            "--job-name",
            "kftest-crash",
            "--folder",
            str(folder),
            "--requeue-on-crash",
            "--checkpoint-dir",
            str(out / "ckpt"),
            "--",
            PYTHON,
            str(worker),
            str(out),
            "crash_after_progress",
        ]
    )
    info = wait_final(job, 240)
    # run 0 committed step 10, crashed, was requeued; run 1 made no progress: FAILED for good
    assert info["JobState"] == "FAILED", info
    assert info["Restarts"] == "1", info
    first = json.loads((folder / f"{job}_0_0_exit.json").read_text())
    second = json.loads((folder / f"{job}_1_0_exit.json").read_text())
    assert first["exception"] == "ValueError: boom in run 0"
    assert first["crash_policy"]["restart"] is True
    assert second["crash_policy"]["restart"] is False
    assert "no progress" in second["crash_policy"]["reason"]
    st = run([PYTHON, SUBMIT, "--status", job])
    assert st.returncode == 0, st.stderr
    assert re.search(r"committed step:\s+10\b", st.stdout), st.stdout
    reason = st.stdout.rstrip().splitlines()[-1]
    assert reason.split()[0] == "reason:", st.stdout
    assert "crash: rank 0 exit 1 (crash): ValueError: boom in run 1" in reason, st.stdout
    assert "not restarted: no progress" in reason, st.stdout


def test_template_runs_a_users_command(slurm_cluster, tmp_path):
    worker, out = _worker(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    res = run(
        [
            "sbatch",
            "--parsable",
            "--job-name=kftest-kfcommand",
            f"--output={logs}/%x-%j.out",
            REPO / "slurm" / "cpu.sbatch",
            str(out),
            "ok",
        ],
        cwd=REPO,
        env_extra={"KF_COMMAND": f"{PYTHON} {worker}"},
    )
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    info = wait_final(job, 180)
    assert info["JobState"] == "COMPLETED", info
    seen = _envs(out, 0)
    assert [(e["RANK"], e["GROUP_RANK"]) for e in seen] == [("0", "0"), ("1", "1")]
    assert {e["MASTER_PORT"] for e in seen} == {str(master_port_for(job, 0))}
    assert {e["KEMPNERFORGE_JOB_ID"] for e in seen} == {job}
