"""The run ledger: one JSON line per thing that happened to a job, in its checkpoint directory.

``events.jsonl`` beside ``step_N/`` and ``latest`` says when each run of the job started, when
its first step ran, how far it got, what each save cost, and how it ended; the launcher adds how
each run ended as it saw it (exit codes, crash, restart). :mod:`kempnerforge.goodput` turns it
into where the wall-clock time went (``kempnerforge report DIR``). Retention never deletes it: it
touches only ``step_N`` directories.

Line format (version 1)::

    {"v": 1, "t": <unix seconds>, "event": "<name>", ...fields}

Events written by the training side (:class:`Ledger`, rank 0 only):

* ``start``: ``job_id``, ``restart``, ``host``, ``pid``, ``world_size``, ``resumed_step`` (None:
  a fresh start), ``who``; under SLURM also ``submit_time``, ``eligible_time``, ``start_time``
  (the controller's queue times of this run, unix seconds) when ``scontrol`` answers.
* ``first_step``: ``step``, the first step of this run has finished (its time, compile and
  warm-up included, counts as start-up).
* ``step``: ``step``, a heartbeat at most every ``beat_s``.
* ``reached``: ``step``, ``step_t``, ``pid``: the last step the previous run reached, as its
  heartbeat file recorded it at every step (written by the next run, before its ``start``): the
  last step reached is known exactly after a SIGKILL, when nothing could be written at the kill.
* ``save``: ``step``, ``blocked_s`` (how long training waited), ``durable_s`` (save start ->
  durable), ``nbytes``. Written when the save is durable; both durations are measured from the
  save's start, so training was blocked over ``[t - max(durable_s, blocked_s), ... + blocked_s]``.
* ``stop``: ``step``, ``reason``, ``exit_code``, ``saved``, ``last_step``, ``last_step_t``
  (durable).
* ``end``: ``step``, ``exit_code``, ``last_step``, ``last_step_t`` (a run that finished; durable).

Events written by the launcher (``launch``, :func:`run_end`, :func:`restart`):

* ``launch``: ``job_id``, ``world_size``, ``who``: the launcher itself started (the report counts
  start-up from here: process start, imports, the load).

* ``run_end``: ``job_id``, ``restart``, ``exit_codes`` (one per rank; None where unknown),
  ``outcome`` (``done|restart|stop|cancelled``), ``reason`` (``preemption|crash|hang|
  node_failure|time_limit|cancel|done|refused|...``), ``rank``/``node`` of a crash when known.
* ``restart``: ``job_id``, ``n`` (the restart count of the run that follows), ``reason``,
  ``rank``, ``node``, ``excluded`` (a node left out, if any), ``took_s`` (first exit of the old
  run -> the new run's processes started). Its text form is :func:`restart_text`.

Torch-free (stdlib and :mod:`kempnerforge.job`): the launcher and the report import it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kempnerforge.job import JobEnvironment

logger = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
HEARTBEAT_FILE = ".events.heartbeat"  # overwritten in place at every step (rank 0)
_HEARTBEAT_BYTES = 160
VERSION = 1
FILE_MODE = 0o600

# Why a run ended, as the ledger and the report name it.
PREEMPTION = "preemption"
CRASH = "crash"
HANG = "hang"
NODE_FAILURE = "node_failure"
TIME_LIMIT = "time_limit"
CANCEL = "cancel"
DONE = "done"
REFUSED = "refused"
FAULTS = (PREEMPTION, CRASH, HANG, NODE_FAILURE)

_warned = False


def _warn_once(what: str, err: BaseException) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(
            "run ledger: %s: %s (training goes on; further ledger errors are silent)", what, err
        )


def path(root: str | os.PathLike[str]) -> str:
    """The ledger file of a checkpoint directory."""
    return os.path.join(os.fspath(root), EVENTS_FILE)


def _line(event: str, fields: dict[str, Any]) -> bytes:
    rec: dict[str, Any] = {"v": VERSION, "t": round(time.time(), 6), "event": event}
    rec.update(fields)
    return (json.dumps(rec, separators=(",", ":"), default=str) + "\n").encode()


def append(
    root: str | os.PathLike[str], event: str, *, durable: bool = False, **fields: Any
) -> None:
    """Append one event line to ``root/events.jsonl`` (the directory is created, 0o700, if missing).

    The line goes out in a single ``os.write`` on an ``O_APPEND`` descriptor. On a local
    filesystem the kernel positions and writes it under the inode lock, so lines of concurrent
    writers never interleave (POSIX promises this only up to ``PIPE_BUF`` bytes; our lines are
    far shorter). On NFS, ``O_APPEND`` is emulated by the client (it seeks to the size it last
    saw, then writes): writers on *different* hosts appending at the same moment can overwrite
    each other's line. The ledger has one writer at a time (rank 0 of the run that holds the job
    lock, and the launcher between runs), and each call opens and closes the file, so with NFS's
    close-to-open consistency a reader on another host sees every closed line. ``durable``:
    fsync before returning (a stop or an end must survive a power loss; the per-step heartbeat
    does not need to).

    Never raises: a ledger problem must not stop training. The first failure in a process is
    logged as a warning, later ones are dropped silently.
    """
    try:
        data = _line(event, fields)
        p = path(root)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        except FileNotFoundError:
            os.makedirs(os.fspath(root), mode=0o700, exist_ok=True)  # as checkpoint dirs
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            n = os.write(fd, data)
            if n != len(data):
                raise OSError(f"short write: {n} of {len(data)} bytes")
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except Exception as e:
        _warn_once(f"cannot append {event!r} to {os.fspath(root)!r}", e)


@dataclass
class Contents:
    """What :func:`scan` found: the events in file order, and the lines it skipped."""

    events: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0  # torn or unparsable lines, the last one included
    torn_last: bool = False  # the file ends in a line without its newline (normal after SIGKILL)


def scan(root: str | os.PathLike[str]) -> Contents:
    """Every complete event of ``root/events.jsonl``; a missing file is an empty ledger.

    A line is complete when it ends in a newline and parses to a JSON object with an ``event``
    and a numeric ``t``. Anything else is skipped and counted: a torn *last* line is what a
    SIGKILL in the middle of a write leaves (or a full disk, a lost NFS write). When a later
    event was appended after a torn line, it is recovered from the end of the joined line.
    """
    out = Contents()
    try:
        with open(path(root), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return out
    except OSError as e:
        logger.warning("run ledger: cannot read %s: %s", path(root), e)
        return out
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends in a newline
    if tail.strip():
        out.torn_last = True
        out.skipped += 1
    for raw in lines:
        if not raw.strip():
            continue
        rec = _parse(raw)
        if rec is None:
            out.skipped += 1
            # a line torn without its newline has the next writer's line glued to it: keep that
            i = raw.rfind(_LINE_START)
            rec = _parse(raw[i:]) if i > 0 else None
        if rec is not None:
            out.events.append(rec)
    return out


_LINE_START = b'{"v":'


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("event"), str):
        return None
    t = rec.get("t")
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return None
    return rec


def read(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete event in file order (see :func:`scan`); skipped lines are logged at
    debug level for a torn last line, as a warning otherwise."""
    c = scan(root)
    bad = c.skipped - int(c.torn_last)
    if bad:
        logger.warning("run ledger %s: skipped %d unparsable line(s)", path(root), bad)
    if c.torn_last:
        logger.debug("run ledger %s: last line is torn (a write was cut short)", path(root))
    return c.events


# ------------------------------------------------------------------------------ SLURM queue times
_QUEUE_FIELDS = {
    "SubmitTime": "submit_time",
    "EligibleTime": "eligible_time",
    "StartTime": "start_time",
}


def read_heartbeat(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last step the heartbeat file recorded (``pid``, ``restart``, ``step``, ``t``), or None."""
    try:
        with open(os.path.join(os.fspath(root), HEARTBEAT_FILE), "rb") as f:
            got = json.loads(f.read(_HEARTBEAT_BYTES).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return got if isinstance(got, dict) and isinstance(got.get("step"), int) else None


def parse_slurm_time(value: str) -> float | None:
    """``2024-05-01T12:00:03`` (the controller's local time) -> unix seconds; ``Unknown``,
    ``None`` and anything unparsable -> None."""
    try:
        return time.mktime(time.strptime(value.strip(), "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def parse_queue_times(show_job: str) -> dict[str, float]:
    """The queue times in one ``scontrol show job -o`` line, keyed as the ledger names them."""
    out: dict[str, float] = {}
    for token in show_job.split():
        key, sep, value = token.partition("=")
        if sep and key in _QUEUE_FIELDS:
            t = parse_slurm_time(value)
            if t is not None:
                out[_QUEUE_FIELDS[key]] = t
    return out


def slurm_queue_times(job_id: str | None, timeout_s: float = 10.0) -> dict[str, float]:
    """One ``scontrol show job -o JOB`` call; {} when SLURM is not there or does not answer."""
    exe = shutil.which("scontrol")
    if not job_id or exe is None:
        return {}
    try:
        res = subprocess.run(
            [exe, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.SubprocessError) as e:
        logger.debug("run ledger: scontrol show job %s: %s", job_id, e)
        return {}
    if res.returncode != 0:
        return {}
    return parse_queue_times(res.stdout)


# ------------------------------------------------------------------------------ the training side
class Ledger:
    """The training side's writer: one per run, events only from rank 0 (others are no-ops).

    Calls are cheap and never raise. :meth:`step_reached` may be called every step: it reads
    ``time.monotonic()`` and writes a ``step`` event only when ``beat_s`` passed since the last
    one, so after a SIGKILL the step reached is known to within ``beat_s``.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, rank: int = 0, beat_s: float = 10.0
    ) -> None:
        self.root = os.fspath(root)
        self.enabled = rank == 0
        self.beat_s = float(beat_s)
        self.job_id: str | None = None
        self.restart = 0
        self.host: str | None = None
        self.under_slurm = False
        self._first_done = False
        self._next_beat = 0.0
        self._last_step: int | None = None
        self._last_mono = 0.0
        self._beat_fd: int | None = None
        if not self.enabled:
            return
        try:
            env = JobEnvironment.from_env()
            self.job_id, self.restart = env.job_id, env.restart_count
            self.host, self.under_slurm = env.hostname, env.under_slurm
        except Exception as e:
            _warn_once("cannot read the job environment", e)

    @property
    def last_step(self) -> int | None:
        """The last step :meth:`step_reached` was told of (None before the first)."""
        return self._last_step

    def _write(self, event: str, durable: bool = False, **fields: Any) -> None:
        if self.enabled:
            append(self.root, event, durable=durable, **fields)

    def _last_fields(self) -> dict[str, Any]:
        """The last step reached and when (unix seconds), from the monotonic clock."""
        if self._last_step is None:
            return {}
        ago = max(0.0, time.monotonic() - self._last_mono)
        return {"last_step": self._last_step, "last_step_t": round(time.time() - ago, 6)}

    def start(self, *, world_size: int, resumed_step: int | None, who: str = "manager") -> None:
        """A run begins; call it as soon as the resume step is chosen, before the load (start-up
        is measured from here, or from SLURM's ``StartTime``). ``resumed_step``: None for a
        fresh start. Durable; under SLURM one ``scontrol`` call (10 s at most) adds the
        controller's queue times of this run."""
        if not self.enabled:
            return
        fields: dict[str, Any] = {
            "job_id": self.job_id,
            "restart": self.restart,
            "host": self.host,
            "pid": os.getpid(),
            "world_size": int(world_size),
            "resumed_step": None if resumed_step is None else int(resumed_step),
            "who": who,
        }
        if self.under_slurm:
            with contextlib.suppress(Exception):
                fields.update(slurm_queue_times(os.environ.get("SLURM_JOB_ID") or self.job_id))
        previous = read_heartbeat(self.root)
        if previous is not None and previous.get("pid") != os.getpid():
            self._write(
                "reached",
                step=previous.get("step"),
                step_t=previous.get("t"),
                pid=previous.get("pid"),
                restart=previous.get("restart"),
            )
        self._write("start", durable=True, **fields)

    def first_step(self, step: int) -> None:
        """Once per Ledger: the first step of this run finished (later calls do nothing)."""
        if not self.enabled or self._first_done:
            return
        self._first_done = True
        now = time.monotonic()
        self._last_step, self._last_mono = int(step), now
        self._heartbeat(int(step))
        self._next_beat = now + self.beat_s
        self._write("first_step", step=int(step))

    def step_reached(self, step: int) -> None:
        """Step ``step`` finished. The first call of a run stands in for :meth:`first_step`."""
        if not self.enabled:
            return
        if not self._first_done:
            self.first_step(step)
            return
        now = time.monotonic()
        self._last_step, self._last_mono = step, now
        self._heartbeat(step)
        if now >= self._next_beat:
            self._next_beat = now + self.beat_s
            self._write("step", step=int(step))

    def _heartbeat(self, step: int) -> None:
        """Overwrite the heartbeat file with this step (one ``pwrite``, no fsync: a killed
        process's writes stay in the page cache; a lost host loses at most the last ones)."""
        try:
            if self._beat_fd is None:
                flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
                self._beat_fd = os.open(os.path.join(self.root, HEARTBEAT_FILE), flags, FILE_MODE)
            line = json.dumps(
                {"pid": os.getpid(), "restart": self.restart, "step": step, "t": time.time()},
                separators=(",", ":"),
            )
            os.pwrite(self._beat_fd, line.ljust(_HEARTBEAT_BYTES - 1).encode() + b"\n", 0)
        except (OSError, TypeError, ValueError) as e:
            _warn_once("cannot write the heartbeat", e)

    def save(self, step: int, *, blocked_s: float, durable_s: float, nbytes: int) -> None:
        """A save of ``step`` is durable (see the module docstring for the times)."""
        self._write(
            "save",
            step=int(step),
            blocked_s=round(float(blocked_s), 6),
            durable_s=round(float(durable_s), 6),
            nbytes=int(nbytes),
        )

    def stop(self, step: int, *, reason: str, exit_code: int, saved: str) -> None:
        """The run stops before its end (preemption, time limit, hang, cancel); durable."""
        self._write(
            "stop",
            durable=True,
            step=int(step),
            reason=reason,
            exit_code=int(exit_code),
            saved=saved,
            **self._last_fields(),
        )

    def end(self, step: int | None, *, exit_code: int) -> None:
        """The run finished (training done); durable."""
        self._write(
            "end",
            durable=True,
            step=None if step is None else int(step),
            exit_code=int(exit_code),
            **self._last_fields(),
        )


# ------------------------------------------------------------------------------ the launcher side
def run_end(
    root: str | os.PathLike[str] | None,
    *,
    job_id: str,
    restart: int,
    exit_codes: Iterable[int | None],
    outcome: str,
    reason: str,
    rank: int | None = None,
    node: str | None = None,
    **extra: Any,
) -> None:
    """The launcher's view of how one run ended; nothing when the checkpoint dir is unknown."""
    if root is None:
        return
    fields: dict[str, Any] = {
        "job_id": job_id,
        "restart": int(restart),
        "exit_codes": list(exit_codes),
        "outcome": outcome,
        "reason": reason,
    }
    if rank is not None:
        fields["rank"] = int(rank)
    if node is not None:
        fields["node"] = node
    fields.update(extra)
    append(root, "run_end", durable=True, **fields)


def restart(
    root: str | os.PathLike[str] | None,
    *,
    job_id: str,
    n: int,
    reason: str,
    rank: int | None = None,
    node: str | None = None,
    excluded: str | None = None,
    took_s: float | None = None,
) -> None:
    """The launcher starts run ``n`` of the job because of ``reason``; nothing without a dir."""
    if root is None:
        return
    append(
        root,
        "restart",
        durable=True,
        job_id=job_id,
        n=int(n),
        reason=reason,
        rank=rank,
        node=node,
        excluded=excluded,
        took_s=None if took_s is None else round(float(took_s), 3),
    )


def restart_text(n: int, reason: str) -> str:
    """The one text line of an in-job restart: ``in-job restart 2: reason=node-failure``."""
    return f"in-job restart {int(n)}: reason={reason.replace('_', '-')}"


def reason_of_code(code: int | None) -> str:
    """What an exit code alone says about why a run ended (the launcher's first guess)."""
    from kempnerforge import exit_codes

    if code is None:
        return CRASH
    return {
        exit_codes.OK: DONE,
        exit_codes.RESTART: PREEMPTION,
        exit_codes.HANG: HANG,
        exit_codes.REFUSED: REFUSED,
    }.get(code, CRASH)


def normalize_reason(reason: str | None) -> str | None:
    """A stop reason as the training side names it (``preemption-signal``, ``time-limit``,
    ``user-cancel``, ``hang``...) -> the ledger's names (``preemption``, ``time_limit``,
    ``cancel``, ``hang``...); unknown names pass through with ``-`` as ``_``."""
    if not reason:
        return None
    r = reason.strip().lower().replace("-", "_")
    if r.startswith("preempt") or r in ("requeued", "requeue", "unknown", "signal"):
        return PREEMPTION
    if r.startswith("time_limit") or r in ("timeout", "timelimit"):
        return TIME_LIMIT
    if "cancel" in r:
        return CANCEL
    if r.startswith("hang"):
        return HANG
    if r.startswith("node"):
        return NODE_FAILURE
    if r in ("crash", "done", "refused"):
        return r
    return r
