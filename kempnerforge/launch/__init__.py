"""Launching any training command: locally or on SLURM, restarted after a preemption.

Laid out by backend, as submitit is; where a process sits in its job (SLURM, torchrun, plain
runs) is :mod:`kempnerforge.job`, below every backend. :mod:`~kempnerforge.launch.signal_relay`
(signals held until a task handles them), :mod:`~kempnerforge.launch.task` (one task's
environment; the sbatch templates' per-task wrapper), :mod:`~kempnerforge.launch.local` (local
mode), :mod:`~kempnerforge.launch.slurm` (submitit, by job: ``submission`` of the sbatch script,
``wrapper`` run in every SLURM task, ``report`` for ``--status``),
:mod:`~kempnerforge.launch.cli` (``python -m kempnerforge.launch``). Nothing here imports torch:
the launcher starts in a fraction of a second and its tasks import what they need.
"""
