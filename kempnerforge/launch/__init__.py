"""Launching any training command: locally or on SLURM, restarted after a preemption.

Laid out by backend: :mod:`~kempnerforge.launch.environment` (where a process sits in its job,
for SLURM, torchrun and plain runs).
"""
