"""The sbatch script that launch/submit.py generates, pinned by a golden file.

A change to the generated script (a flag, the signal, the setup lines) shows in review as a diff
of tests/slurm/golden/. Regenerate after an intended change with
``KF_UPDATE_GOLDEN=1 pytest tests/slurm/test_submit_golden.py``. Needs no cluster: the script is
rendered by submitit's own sbatch writer (the dry run of the real submission path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "submit_dry_run.sbatch"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp("dry") / "slurm"
    return _dry_run(folder), folder


def _dry_run(folder: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SUBMITIT_PREEMPT_SIGNAL"}
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "submit.py"),
            "--dry-run",
            "--config",
            str(REPO / "configs" / "debug.yaml"),
            "--folder",
            str(folder),
            "--nodes",
            "4",
            "--gpus-per-node",
            "4",
            "--cpus-per-task",
            "8",
            "--partition",
            "gpu",
            "--account",
            "my_lab",
            "--qos",
            "normal",
            "--time",
            "1-00:00:00",
            "--signal-lead",
            "180",
            "--max-requeues",
            "20",
            "train.max_steps=1000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def normalise(script: str, folder: Path) -> str:
    """Replace what depends on the machine: the interpreter and the submitit folder."""
    return script.replace(str(folder), "<FOLDER>").replace(sys.executable, "<PYTHON>")


def test_dry_run_matches_golden(dry_run):
    got = normalise(*dry_run)
    if os.environ.get("KF_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(got)
    assert got == GOLDEN.read_text(), (
        "generated sbatch script changed; if intended, rerun with KF_UPDATE_GOLDEN=1 and review "
        f"the diff of {GOLDEN.relative_to(REPO)}"
    )


def test_dry_run_has_what_preemption_needs(dry_run):
    """The lines the resume path relies on, checked by meaning as well as by the golden file."""
    lines = dry_run[0].splitlines()
    assert "#SBATCH --signal=USR1@180" in lines  # to every task: no "B:"
    assert "#SBATCH --requeue" in lines
    assert "#SBATCH --open-mode=append" in lines
    assert "#SBATCH --ntasks-per-node=4" in lines  # one task per GPU
    assert "#SBATCH --time=1440" in lines
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in lines
