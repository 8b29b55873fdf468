"""One task of a job: run any command with a torchrun-compatible environment, relaying signals.

    srun python -m kempnerforge.launch.task [--signal USR1] -- python my_train.py --lr 3e-4

This is what the sbatch templates run on every task, and what the local and SLURM launchers
build each task's environment with. The command gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (from SLURM's variables,
through :class:`~kempnerforge.job.JobEnvironment`), the run's identity in
``KEMPNERFORGE_JOB_ID`` and ``KEMPNERFORGE_RESTART_COUNT``, and the NCCL safe defaults; so a
user's own training script sees what it would see under torchrun.

The command starts with the relayed signals ignored and the wrapper holds a signal that arrives
before the command has installed its handler (:mod:`~kempnerforge.launch.signal_relay`), so a
preemption signal in the first seconds of a run is not fatal. The wrapper exits with the
command's exit code (128 + N when it was killed by signal N). Light on purpose: no torch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from kempnerforge.job import JOB_ID_ENV, RESTART_COUNT_ENV, JobEnvironment
from kempnerforge.launch.records import shell_code
from kempnerforge.launch.signal_relay import (
    SignalRelay,
    blocked,
    command_ignoring,
    signal_numbers,
)
from kempnerforge.nccl import apply_safe_defaults

logger = logging.getLogger(__name__)

# What a launcher defines for its tasks; inherited values (a shell that was itself a task) must
# not leak into how a new task reads its place.
TASK_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    JOB_ID_ENV,
    RESTART_COUNT_ENV,
)
_TORCHELASTIC_PREFIX = "TORCHELASTIC_"


def clean_environment(base: Mapping[str, str], drop_slurm: bool = False) -> dict[str, str]:
    """``base`` without the variables a launcher sets for its tasks (and SLURM's, if asked:
    a local run inside an allocation is still a local run)."""
    out = {}
    for k, v in base.items():
        if k in TASK_VARS or k.startswith(_TORCHELASTIC_PREFIX):
            continue
        if drop_slurm and k.startswith("SLURM_"):
            continue
        out[k] = v
    return out


def slurm_environment(base: Mapping[str, str] | None = None) -> JobEnvironment:
    """This SLURM task's place, read from SLURM's variables only."""
    return JobEnvironment.from_env(clean_environment(os.environ if base is None else base))


def task_environment(place: JobEnvironment, base: Mapping[str, str]) -> dict[str, str]:
    """The environment a task's command runs with: ``base``, the NCCL safe defaults (unless set),
    unbuffered Python output (so a crash leaves its last lines in the log), the torchrun
    variables of ``place`` and the run identity."""
    env = clean_environment(base)
    apply_safe_defaults(env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(place.torchrun_env())
    env[JOB_ID_ENV] = place.job_id
    env[RESTART_COUNT_ENV] = str(place.restart_count)
    return env


def spawn(
    command: Sequence[str], env: Mapping[str, str], ignore: Sequence[int], **popen: Any
) -> subprocess.Popen:
    """Start ``command`` with the signals in ``ignore`` ignored until it installs its handlers."""
    argv = command_ignoring(ignore, list(command), sys.executable)
    with blocked(ignore):
        return subprocess.Popen(argv, env=dict(env), **popen)


class OutputPump:
    """Passes a child's output on as it comes (``sink``, and ``log`` if given) and keeps its
    last lines, so that the launcher can tell how the command ended without re-reading a log
    file that the scheduler may still be writing."""

    def __init__(
        self,
        stream: IO[bytes],
        sink: Callable[[bytes], None],
        log: IO[bytes] | None = None,
        keep: int = 200,
    ) -> None:
        self.stream = stream
        self.sink = sink
        self.log = log
        self.lines: deque[str] = deque(maxlen=keep)
        self._thread = threading.Thread(target=self._run, name="output-pump", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self.stream.fileno()
        partial = b""
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                break
            if not data:
                break
            self.sink(data)
            if self.log is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.log.write(data)
                    self.log.flush()
            *complete, partial = (partial + data).split(b"\n")
            self.lines.extend(ln.decode(errors="replace") for ln in complete)
            if len(partial) > 1 << 16:
                self.lines.append(partial.decode(errors="replace"))
                partial = b""
        if partial:
            self.lines.append(partial.decode(errors="replace"))

    def join(self, timeout: float = 5.0) -> list[str]:
        """Wait for the end of the output (or ``timeout``); the lines kept."""
        self._thread.join(timeout)
        return list(self.lines)


def write_stdout(data: bytes) -> None:
    """Write bytes to this process's stdout at once (the pumps' default sink)."""
    buf = getattr(sys.stdout, "buffer", None)
    if buf is not None:
        buf.write(data)
        buf.flush()
    else:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()


def run_task(command: Sequence[str], signals: Sequence[str]) -> int:
    """Run ``command`` as this task; return its exit code as a shell reports it."""
    sigs = signal_numbers([*signals, "SIGTERM"])
    base = dict(os.environ)
    under_slurm = bool(base.get("SLURM_JOB_ID")) and "SLURM_PROCID" in base
    place = slurm_environment(base) if under_slurm else JobEnvironment.from_env(base)
    # Under SLURM every process of the step already gets the signal: only hold, never resend.
    relay = SignalRelay(forward=not under_slurm)
    relay.install(sigs)
    try:
        child = spawn(command, task_environment(place, base), sigs)
    except OSError as e:
        print(f"kempnerforge.launch.task: cannot start {command[0]!r}: {e}", file=sys.stderr)
        return 127
    relay.watch(child.pid)
    return shell_code(child.wait())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kempnerforge.launch.task",
        description="Run one task's command with torchrun-compatible variables from SLURM.",
    )
    p.add_argument(
        "--signal",
        action="append",
        default=[],
        help="signal to relay (held until the command handles it); repeatable; default USR1. "
        "SIGTERM is always relayed",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        build_parser().error("give the command after --, e.g. -- python train.py")
    i = argv.index("--")
    args = build_parser().parse_args(argv[:i])
    command = argv[i + 1 :]
    if not command:
        build_parser().error("no command after --")
    # srun passes a Ctrl-C to every process of the step: the command decides what it means,
    # and the wrapper waits for it. A handler, not SIG_IGN, so the command inherits the default.
    signal.signal(signal.SIGINT, lambda *_: None)
    return run_task(command, args.signal or ["USR1"])


if __name__ == "__main__":
    sys.exit(main())
