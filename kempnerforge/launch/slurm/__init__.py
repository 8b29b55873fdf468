"""SLURM mode through submitit, one module a job.

* :mod:`~kempnerforge.launch.slurm.submission`: the executor's parameters, the sbatch script of
  ``--dry-run``, submission and the job record.
* :mod:`~kempnerforge.launch.slurm.wrapper`: :class:`SlurmTask`, what runs inside every SLURM
  task (the signal relay, the command as a child, the exit records, the crash policy).
* :mod:`~kempnerforge.launch.slurm.report`: ``--status`` and ``--wait``.

The names are also importable from here: callers use ``kempnerforge.launch.slurm.<name>``, and a
task pickled under ``kempnerforge.launch.slurm.SlurmTask`` must still be found when a requeued
job unpickles it.
"""

from __future__ import annotations

from kempnerforge.launch.slurm.report import (
    FINAL_STATES,
    PREFIX,
    SCHEDULER_ENDS,
    find_record,
    scontrol_job,
    status,
    wait_for,
)
from kempnerforge.launch.slurm.submission import (
    minutes,
    sbatch_options,
    sbatch_script,
    set_preempt_env,
    slurm_available,
    slurm_parameters,
    submit,
    tasks_per_node,
)
from kempnerforge.launch.slurm.wrapper import SlurmTask, scontrol_requeue

__all__ = [
    "FINAL_STATES",
    "PREFIX",
    "SCHEDULER_ENDS",
    "SlurmTask",
    "find_record",
    "minutes",
    "sbatch_options",
    "sbatch_script",
    "scontrol_job",
    "scontrol_requeue",
    "set_preempt_env",
    "slurm_available",
    "slurm_parameters",
    "status",
    "submit",
    "tasks_per_node",
    "wait_for",
]
