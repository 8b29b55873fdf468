#!/usr/bin/env python
"""Submit a KempnerForge training job to SLURM through submitit, or run it locally the same way.

    python launch/submit.py --config configs/debug.yaml --nodes 2 [--gpus-per-node 4]
        [--partition p] [--time 24:00:00] [--account a] [--qos q] [--signal-lead 120]
        [--max-requeues N] [--dry-run] [--local] [--wait] [section.key=value ...]
    python launch/submit.py --status JOB_ID

Every SLURM task runs ``python -m kempnerforge.train`` with torchrun-style variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) derived from SLURM, one task per GPU (or per
``--tasks-per-node`` on CPU). The preemption signal (``--signal``, USR1 by default) is sent with
``#SBATCH --signal=USR1@<lead>`` to every task. The training loop owns it: it agrees across ranks,
saves, makes ``latest`` durable, and rank 0 requeues the job with ``scontrol requeue`` (guarded).
submitit's own handler, which would checkpoint and requeue on rank 0 only from inside the signal
handler, is replaced in each task before training starts.

Without SLURM (or with ``--local``) the same job runs as nodes x tasks-per-node local processes;
SIGUSR1/SIGTERM sent to this launcher reach every worker, and a job that exits 75 is started again,
so preemption behaves the same way on a laptop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

from kempnerforge.nccl import apply_safe_defaults

logger = logging.getLogger("kempnerforge.launch")

EXIT_REQUEUE = 75  # the training's "run me again"
EXIT_REFUSED = 76  # kempnerforge.resilience.requeue.REQUEUE_REFUSED_EXIT_CODE
RECORD_SUFFIX = "_kempnerforge.json"
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


# --------------------------------------------------------------------------- signal delivery


def _catches(pid: int, sig: int) -> bool | None:
    """Whether ``pid`` has a handler installed for ``sig`` (Linux /proc); None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return False


class SignalRelay:
    """Delivers a signal to worker processes once each one handles it.

    Workers start with the signals ignored (so an early signal cannot kill a worker that is still
    importing torch) and install their handler later. A signal that arrives before a worker's
    handler is installed is held and delivered as soon as the handler is there, so it is never lost.
    ``forward=False`` is for SLURM tasks: SLURM already signals every process of the step, so a
    worker that handles the signal got it directly and only the held case needs delivering.
    """

    def __init__(self, forward: bool) -> None:
        self.forward = forward
        self.pids: list[int] = []
        self._pending: list[tuple[int, int]] = []
        self._lock = threading.RLock()  # a second signal may arrive inside the handler
        self._thread: threading.Thread | None = None

    def on_signal(self, signum: int, _frame: Any = None) -> None:
        print(
            f"[kempnerforge.launch] got {signal.Signals(signum).name}: passing it to "
            f"{len(self.pids)} worker(s)",
            file=sys.stderr,
            flush=True,
        )
        with self._lock:
            for pid in self.pids:
                caught = _catches(pid, signum)
                if caught is None:
                    continue
                if caught:
                    if self.forward:
                        _kill(pid, signum)
                else:
                    self._pending.append((pid, signum))
            if self._pending and self._thread is None:
                self._thread = threading.Thread(target=self._deliver_pending, daemon=True)
                self._thread.start()

    def _deliver_pending(self) -> None:
        while True:
            with self._lock:
                keep = []
                for pid, sig in self._pending:
                    caught = _catches(pid, sig)
                    if caught:
                        _kill(pid, sig)
                    elif caught is not None:
                        keep.append((pid, sig))
                self._pending = keep
                if not keep:
                    self._thread = None
                    return
            time.sleep(0.05)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _ignore(signals: list[int]) -> Any:
    def preexec() -> None:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)

    return preexec


def _signal_numbers(names: list[str]) -> list[int]:
    out = []
    for name in names:
        full = name if name.startswith("SIG") else f"SIG{name}"
        if not hasattr(signal, full):
            raise SystemExit(f"unknown signal {name!r}: use a name like USR1 or SIGTERM")
        out.append(int(getattr(signal, full)))
    return out


def _train_command(config: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-u", "-m", "kempnerforge.train", "--config", config, *overrides]


# --------------------------------------------------------------------------- the SLURM task


class TrainTask:
    """What submitit runs in every SLURM task: ``python -m kempnerforge.train`` as a child.

    A child process (not an in-process call) so the training sees exactly the interpreter state
    it sees under torchrun or locally; results must not depend on the launcher.
    """

    def __init__(self, config: str, overrides: list[str], signals: list[str]) -> None:
        self.config = config
        self.overrides = list(overrides)
        self.signals = list(signals)

    def __call__(self) -> dict[str, Any]:
        import submitit

        sigs = _signal_numbers(self.signals)
        relay = SignalRelay(forward=False)
        for s in sigs:  # replaces submitit's rank-0 checkpoint-and-requeue handler
            signal.signal(s, relay.on_signal)

        jenv = submitit.JobEnvironment()
        job_id = str(jenv.job_id)
        restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        env = dict(os.environ)
        apply_safe_defaults(env)  # NVLink multicast off unless the user set it
        env.update(
            RANK=str(jenv.global_rank),
            WORLD_SIZE=str(jenv.num_tasks),
            LOCAL_RANK=str(jenv.local_rank),
            LOCAL_WORLD_SIZE=str(jenv.num_tasks // max(1, jenv.num_nodes)),
            GROUP_RANK=str(jenv.node),
            MASTER_ADDR=env.get("MASTER_ADDR") or jenv.hostnames[0],
            MASTER_PORT=env.get("MASTER_PORT") or str(master_port(job_id, restart)),
        )
        cmd = _train_command(self.config, self.overrides)
        print(
            f"[kempnerforge.launch] job {job_id} restart {restart} rank {jenv.global_rank}/"
            f"{jenv.num_tasks} node {jenv.node} ({os.environ.get('SLURMD_NODENAME', '?')}) "
            f"master {env['MASTER_ADDR']}:{env['MASTER_PORT']}: {shlex.join(cmd)}",
            flush=True,
        )
        child = subprocess.Popen(cmd, env=env, preexec_fn=_ignore(sigs))
        relay.pids.append(child.pid)
        rc = child.wait()
        print(
            f"[kempnerforge.launch] job {job_id} restart {restart} rank "
            f"{jenv.global_rank}: training exited with {rc}",
            flush=True,
        )
        sys.stdout.flush()
        if rc == 0:
            return {"job_id": job_id, "restart_count": restart, "rank": jenv.global_rank}
        if rc in (EXIT_REQUEUE, EXIT_REFUSED):
            # No result file: the job is requeued (75) or stopped by the guard (76).
            os._exit(rc)
        raise RuntimeError(
            f"training exited with code {rc} (job {job_id}, rank {jenv.global_rank})"
        )


def master_port(job_id: str, restart: int) -> int:
    """Same on every task of one run, different across jobs and restarts; below the ephemeral range."""
    return 15000 + zlib.crc32(f"{job_id}:{restart}".encode()) % 15000


# --------------------------------------------------------------------------- submission


def _minutes(spec: str) -> int:
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


def slurm_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The submitit SlurmExecutor parameters for ``args`` (one place, used by submit and dry-run)."""
    params: dict[str, Any] = {
        "job_name": args.job_name,
        "time": _minutes(args.time),
        "nodes": args.nodes,
        "ntasks_per_node": tasks_per_node(args),
        "signal_delay_s": args.signal_lead,
        "stderr_to_stdout": True,
        "setup": [
            # Read by submitit at import in the task: its handler must sit on our signal, not
            # on USR2 (whose default action would kill the task), and is replaced by ours.
            f"export SUBMITIT_PREEMPT_SIGNAL={args.signal.removeprefix('SIG')}",
        ],
        "additional_parameters": {"requeue": True},
    }
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    for key in ("partition", "account", "qos"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    return params


def tasks_per_node(args: argparse.Namespace) -> int:
    return args.tasks_per_node or args.gpus_per_node or 1


def _job_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.max_requeues is not None:
        extra.append(f"resilience.max_requeues={args.max_requeues}")
    return [*args.overrides, *extra]


def _load(args: argparse.Namespace) -> Any:
    """Validate the config and overrides now, before anything is queued."""
    from kempnerforge.config import ConfigError, load_config

    try:
        return load_config(args.config, _job_overrides(args))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def _folder(args: argparse.Namespace, cfg: Any) -> Path:
    return Path(args.folder or Path(cfg.output_dir) / "slurm").absolute()


def _set_preempt_env(args: argparse.Namespace) -> None:
    # submitit reads this once, at import: set it before the first import.
    name = args.signal.removeprefix("SIG")
    if "submitit" in sys.modules and os.environ.get("SUBMITIT_PREEMPT_SIGNAL") != name:
        logger.warning("submitit was imported before SUBMITIT_PREEMPT_SIGNAL=%s was set", name)
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = name


def sbatch_script(args: argparse.Namespace, folder: Path) -> str:
    """Exactly the script submitit will submit for ``args`` (``--dry-run``)."""
    _set_preempt_env(args)
    from submitit.slurm import slurm as sslurm

    command = " ".join(
        [shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))]
    )
    return sslurm._make_sbatch_string(command=command, folder=folder, **slurm_parameters(args))


def submit_slurm(args: argparse.Namespace, cfg: Any) -> str:
    _set_preempt_env(args)
    import cloudpickle
    import submitit

    folder = _folder(args, cfg)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**{f"slurm_{k}": v for k, v in slurm_parameters(args).items()})
    module = sys.modules[TrainTask.__module__]
    if TrainTask.__module__ != "__main__":  # the task node may not have launch/ on its path
        cloudpickle.register_pickle_by_value(module)
    task = TrainTask(str(Path(args.config).absolute()), _job_overrides(args), [args.signal])
    job = executor.submit(task)
    record = {
        "job_id": job.job_id,
        "config": str(Path(args.config).absolute()),
        "overrides": _job_overrides(args),
        "workdir": str(Path.cwd()),
        "output_dir": str(Path(cfg.output_dir).absolute()),
        "checkpoint_dir": str(Path(cfg.checkpoint.dir).absolute()),
        "folder": str(folder),
        "log": str(folder / f"{job.job_id}_0_log.out"),
        "submitted_at": time.time(),
    }
    (folder / f"{job.job_id}{RECORD_SUFFIX}").write_text(json.dumps(record, indent=1))
    return str(job.job_id)


# --------------------------------------------------------------------------- status


def _scontrol_job(job_id: str) -> dict[str, str] | None:
    if shutil.which("scontrol") is None:
        return None
    res = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    )
    if res.returncode != 0 or not res.stdout.strip():
        return None
    line = res.stdout.strip().splitlines()[0]
    return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", line))


def _find_record(job_id: str, info: dict[str, str] | None) -> dict[str, Any] | None:
    candidates = []
    if info and info.get("StdOut"):
        candidates.append(Path(info["StdOut"]).parent / f"{job_id}{RECORD_SUFFIX}")
    candidates += Path.cwd().glob(f"runs/*/slurm/{job_id}{RECORD_SUFFIX}")
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text())
    return None


def committed_step(ckpt_dir: str | Path) -> int | None:
    """The step that ``latest`` points to (a symlink or a file naming the step directory)."""
    latest = Path(ckpt_dir) / "latest"
    try:
        text = os.readlink(latest) if latest.is_symlink() else latest.read_text()
    except OSError:
        return None
    m = re.search(r"(\d+)", text.strip().splitlines()[0] if text.strip() else "")
    if m:
        return int(m.group(1))
    try:
        return int(json.loads(text)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _tail(path: str | Path, n: int) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def status(job_id: str, lines: int = 15) -> int:
    info = _scontrol_job(job_id)
    record = _find_record(job_id, info)
    if info is None and record is None:
        print(
            f"job {job_id}: unknown to scontrol and no record under ./runs/*/slurm/",
            file=sys.stderr,
        )
        return 1
    out = [f"job {job_id}"]
    if info:
        out.append(
            f"  state:          {info.get('JobState', '?')} (reason {info.get('Reason', '?')})"
        )
        out.append(f"  restart count:  {info.get('Restarts', '?')}")
        out.append(
            f"  nodes:          {info.get('NodeList', '?')}  run time {info.get('RunTime', '?')}"
        )
        out.append(f"  exit code:      {info.get('ExitCode', '?')}")
    else:
        out.append("  state:          no longer known to slurmctld (no accounting DB to ask)")
    log = (info or {}).get("StdOut") or (record or {}).get("log")
    if record:
        step = committed_step(record["checkpoint_dir"])
        out.append(f"  committed step: {step if step is not None else 'none yet'}")
        out.append(f"  checkpoints:    {record['checkpoint_dir']}")
        guard = Path(record["checkpoint_dir"]) / "requeue_guard.json"
        if guard.is_file():
            g = json.loads(guard.read_text())
            if str(g.get("job_id")) == job_id:
                out.append(
                    f"  self-requeues:  {g.get('requeues')}"
                    + (f"  REFUSED: {g['refused']}" if g.get("refused") else "")
                )
    if log:
        out.append(f"  log:            {log}")
        out += ["  | " + ln for ln in _tail(log, lines)]
    print("\n".join(out))
    return 0


def wait_for(job_id: str, timeout_s: float) -> str:
    """Poll until the job reaches a final state; print each state and restart change."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        info = _scontrol_job(job_id)
        if info is None:
            return "UNKNOWN"
        now = (info.get("JobState"), info.get("Restarts"))
        if now != seen:
            print(
                f"[kempnerforge.launch] job {job_id}: {now[0]} (restart count {now[1]})", flush=True
            )
            seen = now
        if now[0] in FINAL_STATES:
            return str(now[0])
        time.sleep(0.5)
    return "WAIT_TIMEOUT"


# --------------------------------------------------------------------------- local mode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_local(args: argparse.Namespace, cfg: Any) -> int:
    """Run nodes x tasks-per-node workers here; restart on exit 75 like a requeue would."""
    from kempnerforge.resilience.requeue import last_decision

    nprocs = args.nodes * tasks_per_node(args)
    sigs = _signal_numbers([args.signal, "SIGTERM"])
    relay = SignalRelay(forward=True)
    for s in sigs:
        signal.signal(s, relay.on_signal)
    job_id = f"local-{uuid.uuid4().hex[:8]}"
    cmd = _train_command(str(Path(args.config).absolute()), _job_overrides(args))
    limit = args.max_requeues or 0
    restart = 0
    while True:
        port = _free_port()
        print(
            f"[kempnerforge.launch] job {job_id} restart {restart}: {nprocs} local worker(s), "
            f"master 127.0.0.1:{port}: {shlex.join(cmd)}",
            flush=True,
        )
        procs = []
        for rank in range(nprocs):
            env = dict(os.environ)
            for k in [k for k in env if k.startswith("SLURM_")]:
                del env[k]  # a local run inside an allocation is still a local run
            apply_safe_defaults(env)  # NVLink multicast off unless the user set it
            env.update(
                RANK=str(rank),
                WORLD_SIZE=str(nprocs),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(nprocs),
                GROUP_RANK="0",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                KEMPNERFORGE_JOB_ID=job_id,
                KEMPNERFORGE_RESTART_COUNT=str(restart),
            )
            procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_ignore(sigs)))
        relay.pids = [p.pid for p in procs]
        codes = _wait_all(procs, grace_s=cfg.resilience.save_watchdog_s + 30)
        print(
            f"[kempnerforge.launch] job {job_id} restart {restart}: exit codes {codes}", flush=True
        )
        if all(c == 0 for c in codes):
            return 0
        if any(c not in (0, EXIT_REQUEUE) for c in codes):
            return next(c for c in codes if c not in (0, EXIT_REQUEUE))
        guard = last_decision(cfg.checkpoint.dir)
        if guard is not None and guard.job_id == job_id and guard.refused:
            print(f"[kempnerforge.launch] not restarting: {guard.refused}", flush=True)
            return EXIT_REFUSED
        if limit and restart >= limit:
            print(f"[kempnerforge.launch] not restarting: --max-requeues {limit} used", flush=True)
            return EXIT_REFUSED
        restart += 1


def _wait_all(procs: list[subprocess.Popen], grace_s: float) -> list[int]:
    """Wait for every worker; once one fails (or exits while others hang), end the rest."""
    first_exit: float | None = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return [int(c) for c in codes]  # type: ignore[arg-type]
        done = [c for c in codes if c is not None]
        if done and first_exit is None:
            first_exit = time.monotonic()
        failed = any(c not in (0, EXIT_REQUEUE) for c in done)
        if first_exit is not None and (
            (failed and time.monotonic() - first_exit > 5)
            or time.monotonic() - first_exit > grace_s
        ):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            time.sleep(3)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)


# --------------------------------------------------------------------------- CLI


def slurm_available() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/submit.py",
        description="Submit kempnerforge.train to SLURM via submitit (or run it locally).",
    )
    p.add_argument("--config", help="training config YAML, e.g. configs/debug.yaml")
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
        help="total self-requeues allowed (resilience.max_requeues; 0 = unlimited)",
    )
    p.add_argument(
        "--folder", help="submitit folder for scripts and logs (default <output_dir>/slurm)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    p.add_argument("--status", metavar="JOB_ID", help="state, restarts, committed step, log tail")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run here even if SLURM is reachable")
    mode.add_argument("--slurm", action="store_true", help="fail if SLURM is not reachable")
    p.add_argument(
        "--wait", action="store_true", help="after submitting, follow the job to its end"
    )
    p.add_argument("--wait-timeout", type=float, default=24 * 3600.0)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.max_steps=50")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    args = build_parser().parse_intermixed_args(argv)
    if args.status:
        return status(args.status)
    if not args.config:
        build_parser().error("--config is required (or --status JOB_ID)")
    if args.nodes < 1 or tasks_per_node(args) < 1:
        build_parser().error("--nodes and --tasks-per-node must be >= 1")
    for ov in args.overrides:
        if "=" not in ov:
            build_parser().error(f"override {ov!r} must look like section.key=value")
    cfg = _load(args)
    if args.dry_run:
        print(sbatch_script(args, _folder(args, cfg)), end="")
        return 0
    if args.local or (not args.slurm and not slurm_available()):
        if not args.local:
            print("[kempnerforge.launch] SLURM not reachable: running locally", flush=True)
        return run_local(args, cfg)
    if not slurm_available():
        raise SystemExit(
            "error: --slurm given but `sinfo` fails: is SLURM_CONF set / slurmctld up?"
        )
    job_id = submit_slurm(args, cfg)
    print(f"Submitted job {job_id}", flush=True)
    print(f"  logs:   {_folder(args, cfg)}/{job_id}_<task>_log.out", flush=True)
    print(f"  status: python launch/submit.py --status {job_id}", flush=True)
    if args.wait:
        state = wait_for(job_id, args.wait_timeout)
        return 0 if state == "COMPLETED" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
