"""The SLURM backend's layout: one module a job, every name still reachable from
``kempnerforge.launch.slurm``, nothing that imports torch, and ``kempnerforge.job`` below it all."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import kempnerforge.launch.slurm as slurm
from kempnerforge.launch.slurm import report, submission, wrapper

NAMES = {
    submission: [
        "minutes",
        "sbatch_options",
        "sbatch_script",
        "set_preempt_env",
        "slurm_available",
        "slurm_parameters",
        "submit",
        "tasks_per_node",
    ],
    wrapper: ["SlurmTask", "scontrol_requeue", "PREFIX"],
    report: ["FINAL_STATES", "SCHEDULER_ENDS", "find_record", "scontrol_job", "status", "wait_for"],
}


def test_every_name_is_reachable_from_the_package():
    for module, names in NAMES.items():
        for name in names:
            assert getattr(slurm, name) is getattr(module, name), (module.__name__, name)
    assert slurm.PREFIX == "[kempnerforge.launch]"


def test_a_task_pickled_under_the_package_name_still_unpickles():
    """A requeued job unpickles the task it was submitted with, whichever module named it then."""
    task = wrapper.SlurmTask(["python", "t.py"], ["USR1"], "ckpt", True, 3)
    raw = pickle.dumps(task, protocol=0)
    assert b"kempnerforge.launch.slurm.wrapper\n" in raw
    old = pickle.loads(
        raw.replace(b"kempnerforge.launch.slurm.wrapper\n", b"kempnerforge.launch.slurm\n")
    )
    assert type(old) is wrapper.SlurmTask
    assert vars(old) == vars(task)


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SUBMITIT_PREEMPT_SIGNAL"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )


def test_the_launcher_imports_no_torch_and_the_job_module_no_launcher():
    res = _fresh(
        "import sys\n"
        "import kempnerforge.launch.cli, kempnerforge.launch.slurm\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "assert not bad, bad[:5]\n"
    )
    assert res.returncode == 0, res.stderr
    res = _fresh(
        "import sys\n"
        "import kempnerforge.job\n"
        "up = [m for m in sys.modules if m.startswith('kempnerforge.launch')]\n"
        "assert not up, up\n"
    )
    assert res.returncode == 0, res.stderr
