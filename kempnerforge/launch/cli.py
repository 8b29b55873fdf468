"""The launcher's command line: ``python -m kempnerforge.launch`` (also ``kempnerforge-submit``
and ``launch/submit.py``).

    python -m kempnerforge.launch [--local | --slurm] --nodes N --tasks-per-node K
        [--partition P --time T --account A --qos Q --gpus-per-node G --cpus-per-task C
         --job-name NAME --signal USR1 --signal-lead 120 --max-requeues N --folder DIR
         --sbatch KEY[=VALUE] ...]
        [--checkpoint-dir DIR] [--requeue-on-crash] [--grace S] [--dry-run] [--wait]
        (--config CFG [section.key=value ...] | -- COMMAND ...)
    python -m kempnerforge.launch --status JOB_ID [--folder DIR]

Without ``--`` every task runs ``python -u -m kempnerforge.train --config CFG [overrides]``; the
config and overrides are validated before anything is queued (that path loads the training
config, which imports torch; nothing else here does). With ``--`` every task runs the given
command with torchrun-compatible variables. SLURM is used when it answers (``sinfo``), unless
``--local``; ``--slurm`` fails instead of falling back.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from kempnerforge.launch.local import LocalJob, run_local
from kempnerforge.launch.signal_relay import signal_numbers
from kempnerforge.launch.slurm import report, submission

logger = logging.getLogger(__name__)

DEFAULT_GRACE_S = 120.0
PROG = "python -m kempnerforge.launch"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run a training command on SLURM via submitit, or locally with the same "
        "preemption semantics. Give --config CFG for kempnerforge.train, or -- COMMAND.",
    )
    p.add_argument("--config", help="training config YAML for kempnerforge.train")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument(
        "--tasks-per-node",
        type=int,
        default=0,
        help="tasks per node (default: --gpus-per-node, or 1 on CPU)",
    )
    p.add_argument("--cpus-per-task", type=int, default=0, help="default: the cluster's")
    p.add_argument("--partition")
    p.add_argument("--time", default="60", help="SLURM time limit, e.g. 24:00:00 or 90 (minutes)")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--job-name", default="kempnerforge")
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="any other #SBATCH option, repeatable: --sbatch nodelist=n[3-4] --sbatch exclusive",
    )
    p.add_argument("--signal", default="USR1", help="preemption signal sent to every task")
    p.add_argument(
        "--signal-lead",
        type=int,
        default=120,
        help="seconds before the time limit to send the signal (SLURM may be ~30 s late)",
    )
    p.add_argument(
        "--max-requeues",
        type=int,
        default=None,
        help="restarts allowed in total; 0 (the default) means unlimited. kempnerforge.train "
        "also gets it as resilience.max_requeues (not given: the config's value)",
    )
    p.add_argument(
        "--folder",
        help="scripts, logs and records (default <output_dir>/slurm or <output_dir>/local; "
        "with -- COMMAND: ./runs/slurm or ./runs/local)",
    )
    p.add_argument(
        "--checkpoint-dir",
        help="where the job's checkpoints are, to judge progress (default for kempnerforge.train: "
        "checkpoint.dir of the config)",
    )
    p.add_argument(
        "--requeue-on-crash",
        action="store_true",
        help="start a crashed run again, but only if it advanced the resume step",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=None,
        help="local: seconds a task may run on after another exited, or after a cancel, before "
        "it is ended (default: resilience.save_watchdog_s + 30 for kempnerforge.train, else 120)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    p.add_argument(
        "--status", metavar="JOB_ID", help="state, restarts, resume step, stop or crash reason"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run here even if SLURM is reachable")
    mode.add_argument("--slurm", action="store_true", help="fail if SLURM is not reachable")
    p.add_argument(
        "--wait", action="store_true", help="after submitting, follow the job to its end"
    )
    p.add_argument("--wait-timeout", type=float, default=24 * 3600.0)
    p.add_argument(
        "overrides",
        nargs="*",
        help="config overrides, positional: section.key=value, e.g. train.max_steps=50",
    )
    return p


def unknown_options(parser: argparse.ArgumentParser, extras: list[str]) -> None:
    """Stop, naming them, on options the launcher does not know.

    Config overrides are positional, so the value of an unknown ``--flag 1`` would be taken for
    one: the error names the option and says how an override is written instead.
    """
    flags = [e for e in extras if e.startswith("-")]
    if not flags:
        return
    names = ", ".join(f.partition("=")[0] for f in flags)
    hint = "config overrides are positional section.key=value, e.g. train.max_steps=50"
    first = flags[0].lstrip("-")
    if "=" in first and "." in first.partition("=")[0]:
        hint += f" (without dashes: {first})"
    what = "unknown option" if len(flags) == 1 else "unknown options"
    parser.error(f"{what} {names}: {hint}; {PROG} --help lists the options")


def split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """The launcher's own arguments, and the command after the first ``--`` (None: no ``--``)."""
    if "--" not in argv:
        return argv, None
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def train_command(config: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-u", "-m", "kempnerforge.train", "--config", config, *overrides]


def _job_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.max_requeues is not None:
        extra.append(f"resilience.max_requeues={args.max_requeues}")
    return [*args.overrides, *extra]


def _load_config(args: argparse.Namespace) -> Any:
    """Validate the config and overrides now, before anything is queued (imports torch)."""
    from kempnerforge.config import ConfigError, load_config

    try:
        return load_config(args.config, _job_overrides(args))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    own, command = split_command(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    args, extras = parser.parse_known_intermixed_args(own)
    unknown_options(parser, extras)
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.status:
        return report.status(args.status, args.folder)
    if command is not None:
        if args.config or args.overrides:
            parser.error(
                "give either --config CFG [overrides] (kempnerforge.train) or -- COMMAND, not both"
            )
        if not command:
            parser.error("no command after --")
    elif not args.config:
        parser.error("--config is required (or -- COMMAND, or --status JOB_ID)")
    if args.nodes < 1 or submission.tasks_per_node(args) < 1:
        parser.error("--nodes and --tasks-per-node must be >= 1")
    for ov in args.overrides:
        if "=" not in ov:
            parser.error(f"override {ov!r} must look like section.key=value")
    signal_numbers([args.signal])  # a bad name stops here, not in a task

    record: dict[str, Any] = {}
    if command is None:
        cfg = _load_config(args)
        config = str(Path(args.config).absolute())
        command = train_command(config, _job_overrides(args))
        output_dir = Path(cfg.output_dir).absolute()
        checkpoint_dir = Path(args.checkpoint_dir or cfg.checkpoint.dir).absolute()
        grace = args.grace if args.grace is not None else cfg.resilience.save_watchdog_s + 30
        slurm_folder, local_folder = output_dir / "slurm", output_dir / "local"
        record = {
            "config": config,
            "overrides": _job_overrides(args),
            "output_dir": str(output_dir),
        }
    else:
        checkpoint_dir = Path(args.checkpoint_dir).absolute() if args.checkpoint_dir else None
        grace = args.grace if args.grace is not None else DEFAULT_GRACE_S
        slurm_folder, local_folder = Path("runs/slurm"), Path("runs/local")
    if args.requeue_on_crash and checkpoint_dir is None:
        parser.error("--requeue-on-crash needs --checkpoint-dir: progress is judged by it")

    if args.dry_run:
        if args.local:
            n = args.nodes * submission.tasks_per_node(args)
            print(
                f"[kempnerforge.launch] dry run: {n} local task(s) would run: {shlex.join(command)}"
            )
        else:
            folder = Path(args.folder or slurm_folder).absolute()
            print(submission.sbatch_script(args, folder, command), end="")
        return 0
    local = args.local or (not args.slurm and not submission.slurm_available())
    folder = Path(args.folder or (local_folder if local else slurm_folder)).absolute()
    if local:
        if not args.local:
            print("[kempnerforge.launch] SLURM not reachable: running locally", flush=True)
        job = LocalJob(
            command=command,
            nodes=args.nodes,
            tasks_per_node=submission.tasks_per_node(args),
            signals=signal_numbers([args.signal]),
            grace_s=grace,
            max_requeues=args.max_requeues or 0,
            requeue_on_crash=args.requeue_on_crash,
            checkpoint_dir=checkpoint_dir,
            folder=folder,
        )
        return run_local(job)
    if not submission.slurm_available():
        raise SystemExit(
            "error: --slurm given but `sinfo` fails: is SLURM_CONF set / slurmctld up?"
        )
    job_id = submission.submit(args, command, folder, checkpoint_dir, **record)
    print(f"Submitted job {job_id}", flush=True)
    print(f"  logs:   {folder}/{job_id}_<task>_log.out", flush=True)
    print(f"  status: {PROG} --status {job_id}", flush=True)
    if args.wait:
        state = report.wait_for(job_id, args.wait_timeout)
        return 0 if state == "COMPLETED" else 1
    return 0
