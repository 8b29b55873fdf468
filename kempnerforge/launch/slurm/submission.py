"""Submission through submitit: the executor's parameters, the sbatch script, the job record.

One submitit task per SLURM task, each running a
:class:`~kempnerforge.launch.slurm.wrapper.SlurmTask`. The parameters are built in one place,
:func:`slurm_parameters`, so that ``--dry-run`` prints the script exactly as submitit writes it
(same parameters, same writer) and a submission cannot drift from what a dry run showed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kempnerforge.launch import records
from kempnerforge.launch.slurm.wrapper import SlurmTask

logger = logging.getLogger(__name__)


def slurm_available() -> bool:
    """Whether SLURM answers here (``sbatch`` and ``sinfo`` on PATH, and ``sinfo`` works)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def minutes(spec: str) -> int:
    """SLURM time ([D-]HH:MM:SS, MM:SS, MM, D-HH) -> whole minutes (at least 1)."""
    days = 0
    if "-" in spec:
        d, spec = spec.split("-", 1)
        days = int(d)
        parts = [int(p) for p in spec.split(":")]
        parts += [0] * (3 - len(parts))  # D-HH, D-HH:MM
        h, m, s = parts
    else:
        parts = [int(p) for p in spec.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts
    return max(1, days * 1440 + h * 60 + m + (1 if s else 0))


def sbatch_options(items: list[str]) -> dict[str, Any]:
    """``["nodelist=n[3-4]", "exclusive"]`` -> submitit's additional parameters."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.removeprefix("--").partition("=")
        if not key:
            raise SystemExit(f"error: --sbatch {item!r}: give KEY=VALUE or KEY")
        out[key.replace("-", "_")] = value if sep else True
    return out


def tasks_per_node(args: argparse.Namespace) -> int:
    return args.tasks_per_node or args.gpus_per_node or 1


def _comment(text: str) -> str:
    """One script line, whatever ``text`` holds: a newline must not end the comment."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def slurm_parameters(args: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    """The submitit SlurmExecutor parameters (one place, used by submit and dry-run)."""
    params: dict[str, Any] = {
        "job_name": args.job_name,
        "time": minutes(args.time),
        "nodes": args.nodes,
        "ntasks_per_node": tasks_per_node(args),
        "signal_delay_s": args.signal_lead,
        "stderr_to_stdout": True,
        "setup": [
            # What each task runs lives in the pickled task; this line shows it to a reader.
            _comment(f"# every task runs: {shlex.join(command)}"),
            # Read by submitit at import in the task: its handler must sit on our signal, not
            # on USR2 (whose default action would kill the task), and is replaced by ours.
            f"export SUBMITIT_PREEMPT_SIGNAL={args.signal.removeprefix('SIG')}",
            # Read by the training side to tell a time-limit warning from a preemption signal.
            f"export KEMPNERFORGE_SIGNAL_LEAD={args.signal_lead}",
        ],
        "additional_parameters": {"requeue": True, **sbatch_options(args.sbatch)},
    }
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    for key in ("partition", "account", "qos"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    return params


def set_preempt_env(sig: str) -> None:
    """submitit reads SUBMITIT_PREEMPT_SIGNAL once, at import: set it before the first import."""
    name = sig.removeprefix("SIG")
    if "submitit" in sys.modules and os.environ.get("SUBMITIT_PREEMPT_SIGNAL") != name:
        logger.warning("submitit was imported before SUBMITIT_PREEMPT_SIGNAL=%s was set", name)
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = name


def sbatch_script(args: argparse.Namespace, folder: Path, command: list[str]) -> str:
    """Exactly the script submitit will submit for ``args`` (``--dry-run``)."""
    set_preempt_env(args.signal)
    from submitit.slurm import slurm as sslurm

    run = " ".join(
        [shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))]
    )
    return sslurm._make_sbatch_string(command=run, folder=folder, **slurm_parameters(args, command))


def submit(
    args: argparse.Namespace,
    command: list[str],
    folder: Path,
    checkpoint_dir: Path | None,
    **record: Any,
) -> str:
    """Submit the job; write its job record next to the logs; return the job id."""
    set_preempt_env(args.signal)
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        **{f"slurm_{k}": v for k, v in slurm_parameters(args, command).items()}
    )
    task = SlurmTask(
        command,
        [args.signal],
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        requeue_on_crash=args.requeue_on_crash,
        max_requeues=args.max_requeues or 0,
    )
    job = executor.submit(task)
    records.write_json(
        records.job_record_path(folder, job.job_id),
        {
            "job_id": job.job_id,
            "mode": "slurm",
            "command": command,
            "workdir": str(Path.cwd()),
            "folder": str(folder),
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
            "log": str(records.log_path(folder, job.job_id, 0)),
            "world_size": args.nodes * tasks_per_node(args),
            "requeue_on_crash": args.requeue_on_crash,
            "max_requeues": args.max_requeues or 0,
            "submitted_at": time.time(),
            **record,
        },
    )
    return str(job.job_id)
