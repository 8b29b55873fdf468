"""The sbatch scripts that the launcher generates, pinned by golden files.

A change to a generated script (a flag, the signal, the setup lines) shows in review as a diff
of tests/slurm/golden/. Regenerate after an intended change with
``KF_UPDATE_GOLDEN=1 pytest tests/slurm/test_submit_golden.py``. Needs no cluster: the script is
rendered by submitit's own sbatch writer (the dry run of the real submission path). Two forms:
the default command (``kempnerforge.train --config ...``) and a user's command after ``--``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"

SLURM_ARGS = [
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
]
FORMS = {
    "submit_dry_run.sbatch": [
        "--config",
        str(REPO / "configs" / "debug.yaml"),
        "train.max_steps=1000",
    ],
    "submit_dry_run_command.sbatch": [
        "--",
        "python",
        "my_train.py",
        "--lr",
        "3e-4",
        "--data=/my data/tok.npy",
    ],
}


def _dry_run(folder: Path, form: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SUBMITIT_PREEMPT_SIGNAL"}
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "submit.py"),
            "--dry-run",
            "--folder",
            str(folder),
            *SLURM_ARGS,
            *form,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture(scope="module", params=sorted(FORMS))
def dry_run(request, tmp_path_factory) -> tuple[str, str, Path]:
    folder = tmp_path_factory.mktemp("dry") / "slurm"
    return request.param, _dry_run(folder, FORMS[request.param]), folder


def normalise(script: str, folder: Path) -> str:
    """Replace what depends on the machine: the interpreter, the submitit folder, the checkout."""
    return (
        script.replace(str(folder), "<FOLDER>")
        .replace(sys.executable, "<PYTHON>")
        .replace(str(REPO), "<REPO>")
    )


def test_dry_run_matches_golden(dry_run):
    name, script, folder = dry_run
    got = normalise(script, folder)
    golden = GOLDEN / name
    if os.environ.get("KF_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(got)
    assert got == golden.read_text(), (
        "generated sbatch script changed; if intended, rerun with KF_UPDATE_GOLDEN=1 and review "
        f"the diff of {golden.relative_to(REPO)}"
    )


def test_dry_run_has_what_preemption_needs(dry_run):
    """The lines the resume path relies on, checked by meaning as well as by the golden file."""
    lines = dry_run[1].splitlines()
    assert "#SBATCH --signal=USR1@180" in lines  # to every task: no "B:"
    assert "#SBATCH --requeue" in lines
    assert "#SBATCH --open-mode=append" in lines
    assert "#SBATCH --ntasks-per-node=4" in lines  # one task per GPU
    assert "#SBATCH --time=1440" in lines
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in lines


def test_a_newline_in_the_command_cannot_add_a_script_line(tmp_path):
    script = _dry_run(tmp_path / "slurm", ["--", "python", "-c", "print(1)\necho injected"])
    assert "\necho injected" not in script
    assert next(ln for ln in script.splitlines() if "injected" in ln).startswith("# every task")
