"""A job-level writer lock on a checkpoint directory.

Two jobs saving into the same checkpoint directory silently interleave steps, fight over
``latest`` and delete each other's checkpoints through retention. This lock refuses the second
job with a message naming the first one.

Why "job" and not "process" or "manager object":

* one training run is a process tree (torchrun workers, srun tasks on several nodes), and may
  build several :class:`CheckpointManager` objects in one process; all of them are one writer;
* a job requeued by SLURM keeps its ``SLURM_JOB_ID`` and must get its directory back at once,
  even though the previous incarnation was SIGKILLed and never released anything;
* a reader that only loads (evaluation, ``kempnerforge ckpt``) takes no lock at all.

How it works (two files inside the checkpoint directory, both ignored by retention):

``.lock``
    never replaced; the holder process keeps it open with ``fcntl.flock(LOCK_EX)``. The kernel
    drops that lock when the process dies, however it dies (SIGKILL included).
``.lock.json``
    the holder's record ``{job_id, host, pid, since, ...}``, replaced atomically (write a
    temporary file, rename). Its mtime is a heartbeat refreshed every ``heartbeat_s`` seconds by
    a daemon thread of the holder.

A process that wants to write calls :func:`acquire_job_lock`. It is granted when the record
names its own job, or when there is no live holder: the record is missing, or the ``flock`` is
free and the recorded pid is dead on this host, or the recorded holder is on another host and
its heartbeat is older than ``stale_after_s``.

Shared filesystems (why the heartbeat exists): ``flock`` is coherent across nodes on NFSv4
(Linux emulates it with byte-range locks; a crashed client's lock lives until its lease ends,
~90 s), on Lustre only when mounted with ``-o flock`` (``localflock`` makes it node-local,
``noflock`` makes it fail), and on GPFS. We never *rely* on cross-node coherence: for a
holder on another host only the heartbeat counts, so after a SIGKILL on another node the
directory stays locked for at most ``stale_after_s`` (unless the same job comes back, which is
let in at once). Heartbeat ages compare the file's mtime, set by the file server, with this
host's clock: keep clocks in sync (NTP) or raise ``stale_after_s``. Where ``flock`` is not
supported at all, the lock degrades to record + pid liveness + heartbeat, with one warning.

Forked children (DataLoader workers): a child inherits the holder's descriptor of ``.lock``, which
shares the holder's open file description, so ``flock(LOCK_UN)`` in the child would drop the
holder's lock too, while ``close()`` of the child's copy does not. A child therefore never
unlocks, never rewrites or removes the record, and never beats the heartbeat: at fork it closes
its copy of the descriptor (a worker that outlives the holder does not keep the lock alive) and
forgets the registry; a handle it inherited releases nothing but its own state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kempnerforge.checkpoint import storage
from kempnerforge.job import JobEnvironment

logger = logging.getLogger(__name__)

LOCK_FILE = storage.LOCK_FILE
RECORD_FILE = storage.LOCK_RECORD_FILE

DEFAULT_HEARTBEAT_S = 15.0
DEFAULT_STALE_AFTER_S = 120.0


class CheckpointDirLockedError(RuntimeError):
    """Another job holds the writer lock on this checkpoint directory."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) the lock, as stored in ``.lock.json``."""

    job_id: str
    host: str
    pid: int
    since: float  # unix time the holder took the lock
    user: str = ""

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        who = f"job {self.job_id!r} (host {self.host}, pid {self.pid}"
        if self.user:
            who += f", user {self.user}"
        return who + f", since {since})"


def current_job_id() -> str:
    """The identity shared by every process of this run (see :class:`JobEnvironment`).

    Only an entrypoint or a launcher defines a run's identity (``KEMPNERFORGE_JOB_ID``, SLURM's
    job id, torchrun's run id); a process that has none is a run of its own. Nothing here
    changes the environment, so processes a parent starts later are not mistaken for it.
    """
    return JobEnvironment.from_env().run_identity


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def read_holder(directory: str | os.PathLike) -> LockHolder | None:
    """The recorded holder of ``directory``'s lock, or ``None`` (no record, or unreadable)."""
    path = Path(directory) / RECORD_FILE
    try:
        data = json.loads(path.read_text())
        return LockHolder(
            job_id=str(data["job_id"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            since=float(data["since"]),
            user=str(data.get("user", "")),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning(
            "lock record %s is unreadable (%s); treating the directory as unlocked", path, e
        )
        return None


def _heartbeat_age(directory: Path) -> float | None:
    try:
        return time.time() - (directory / RECORD_FILE).stat().st_mtime
    except FileNotFoundError:
        return None


def _write_record(directory: Path, holder: LockHolder) -> None:
    """Replace ``.lock.json`` atomically (a reader sees the old record or the new one)."""
    storage.atomic_write_json(directory / RECORD_FILE, asdict(holder), mode=0o644)


class _HeldLock:
    """The process-wide state for one locked directory (shared by every handle)."""

    def __init__(self, directory: Path, holder: LockHolder, fd: int | None, heartbeat_s: float):
        self.directory = directory
        self.holder = holder
        self.fd = fd  # None: a member of a job whose lock another process holds
        self.owner_pid = os.getpid()  # the process that took (or joined) it
        self.refs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if fd is not None:
            self._thread = threading.Thread(
                target=self._beat, args=(heartbeat_s,), name="kf-ckpt-lock-heartbeat", daemon=True
            )
            self._thread.start()

    def _beat(self, every: float) -> None:
        record = self.directory / RECORD_FILE
        while not self._stop.wait(every):
            current = read_holder(self.directory)
            if current is None or current.job_id != self.holder.job_id:
                logger.error(
                    "checkpoint dir %s: our lock record was replaced by %s; another job may be "
                    "writing here",
                    self.directory,
                    current.describe() if current else "nothing",
                )
                return
            with contextlib.suppress(OSError):
                os.utime(record)

    def drop_inherited(self) -> None:
        """In a process forked from the owner: close this process's copy of the descriptor.

        ``close()`` of one of several descriptors sharing an open file description leaves the
        ``flock`` in place (``LOCK_UN`` would not); the heartbeat thread did not come along.
        """
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        if os.getpid() != self.owner_pid:
            self.drop_inherited()  # a forked copy: the lock and its record are the owner's
            return
        self._stop.set()
        if self.fd is None:
            return
        current = read_holder(self.directory)
        if (
            current is not None
            and current.job_id == self.holder.job_id
            and current.pid == os.getpid()
        ):
            with contextlib.suppress(OSError):
                (self.directory / RECORD_FILE).unlink()
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None


_registry: dict[str, _HeldLock] = {}
_registry_mutex = threading.RLock()  # a GC finalizer may release inside an acquire
_warned_no_flock = False


def _forget_in_child() -> None:
    """After ``fork``, in the child: the parent's locks are not this process's to hold.

    The child closes its copies of their descriptors (never ``LOCK_UN``) and starts with an
    empty registry, so a lock it asks for itself is a new acquisition (it joins its job's lock
    as a member). The mutex is new: another thread of the parent may have held it at fork.
    """
    global _registry_mutex
    _registry_mutex = threading.RLock()
    for held in _registry.values():
        held.drop_inherited()
    _registry.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class JobLock:
    """A handle on the job lock of one directory; :meth:`release` drops this handle.

    The process keeps the lock until its last handle is released (or it exits).
    """

    def __init__(self, held: _HeldLock):
        self._held: _HeldLock | None = held

    @property
    def directory(self) -> Path:
        assert self._held is not None
        return self._held.directory

    @property
    def holder(self) -> LockHolder:
        assert self._held is not None
        return self._held.holder

    @property
    def owns_flock(self) -> bool:
        """True in the process that holds the kernel lock (and beats the heartbeat)."""
        return self._held is not None and self._held.fd is not None

    def check(self) -> None:
        """Raise if another job has taken the directory over since we locked it.

        Cheap (one small file read); call it before committing a save.
        """
        if self._held is None:
            raise RuntimeError("check() on a released JobLock")
        current = read_holder(self._held.directory)
        if current is not None and current.job_id != self._held.holder.job_id:
            raise CheckpointDirLockedError(
                f"checkpoint directory {self._held.directory} was taken over by "
                f"{current.describe()} while this job ({self._held.holder.job_id!r}) was writing; "
                "two jobs must not share a checkpoint directory"
            )

    def release(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        with _registry_mutex:
            held.refs -= 1
            if held.refs <= 0:
                key = str(held.directory)
                if _registry.get(key) is held:  # not a lock a forked child took on its own
                    del _registry[key]
                held.close()

    def __enter__(self) -> JobLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_job_lock(
    directory: str | os.PathLike,
    *,
    job_id: str | None = None,
    wait_s: float = 3.0,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    dir_mode: int = 0o700,
) -> JobLock:
    """Take (or join) this job's writer lock on ``directory``; raise if another job holds it.

    ``wait_s`` covers start-up races: a sibling process of the same job may hold the kernel
    lock a few milliseconds before it has written its record. Raises
    :class:`CheckpointDirLockedError` naming the holder.
    """
    if heartbeat_s <= 0 or stale_after_s <= heartbeat_s:
        raise ValueError(
            f"lock timing: need 0 < heartbeat_s < stale_after_s, got {heartbeat_s} and {stale_after_s}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=dir_mode)
    key = str(directory.resolve())
    job = job_id or current_job_id()
    with _registry_mutex:
        held = _registry.get(key)
        if held is not None and held.holder.job_id == job:
            held.refs += 1
            return JobLock(held)
        held = _acquire(Path(key), job, wait_s, stale_after_s, heartbeat_s)
        held.refs = 1
        _registry[key] = held
        return JobLock(held)


def _acquire(
    directory: Path, job: str, wait_s: float, stale_after_s: float, heartbeat_s: float
) -> _HeldLock:
    global _warned_no_flock
    host = socket.gethostname()
    me = LockHolder(job_id=job, host=host, pid=os.getpid(), since=time.time(), user=_user())
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        flock_state = "free"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                flock_state = "held"
            elif e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                flock_state = "unsupported"
                if not _warned_no_flock:
                    _warned_no_flock = True
                    logger.warning(
                        "flock is not supported on %s (%s); the checkpoint lock relies on its "
                        "record and heartbeat only",
                        directory,
                        e,
                    )
            else:
                os.close(fd)
                raise
        holder = read_holder(directory)
        verdict = _judge(holder, flock_state, me, stale_after_s, _heartbeat_age(directory))
        if verdict == "member":
            # Another process of this job holds the kernel lock: join without holding it.
            if flock_state == "free":
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            assert holder is not None
            logger.debug("joining job lock on %s held by pid %d", directory, holder.pid)
            return _HeldLock(directory, holder, None, heartbeat_s)
        if verdict == "take":
            if holder is not None and holder.job_id != job:
                logger.warning(
                    "checkpoint dir %s: taking over the lock of %s (no longer alive)",
                    directory,
                    holder.describe(),
                )
            _write_record(directory, me)
            return _HeldLock(directory, me, fd, heartbeat_s)
        # verdict == "refuse"
        if flock_state == "free":
            fcntl.flock(fd, fcntl.LOCK_UN)
        if time.monotonic() >= deadline:
            if (
                flock_state == "held"
                and holder is not None
                and holder.host == host
                and not _pid_alive(holder.pid)
            ):
                # The recorded holder is dead, yet the kernel lock is still held: a process that
                # inherited the descriptor outlives it (one forked without Python's fork hooks,
                # or handed the descriptor). After wait_s the record would name a live starter
                # if there were one, so this is an orphan.
                logger.warning(
                    "checkpoint dir %s: %s is dead but its lock file is still held open by a "
                    "process that inherited it; taking the lock over",
                    directory,
                    holder.describe(),
                )
                _write_record(directory, me)
                return _HeldLock(directory, me, fd, heartbeat_s)
            os.close(fd)
            raise CheckpointDirLockedError(_refusal(directory, holder, job, stale_after_s))
        time.sleep(0.05)


def _judge(
    holder: LockHolder | None,
    flock_state: str,
    me: LockHolder,
    stale_after_s: float,
    age: float | None,
) -> str:
    """Decide between "take" (we hold it now), "member" (our job holds it) and "refuse"."""
    if holder is not None and holder.job_id == me.job_id:
        if flock_state == "held":
            return "member"
        if (
            holder.host == me.host
            and holder.pid != me.pid
            and _pid_alive(holder.pid)
            and flock_state == "unsupported"
        ):
            return "member"
        return "take"  # the job's previous holder is gone: become the holder
    if flock_state == "held":
        return "refuse"  # a live process on a coherent filesystem holds it (record may lag)
    if holder is None:
        return "take"
    if holder.host == me.host:
        # Same host: the pid tells. (With a free flock, a live pid is a process that never
        # took the kernel lock, e.g. flock unsupported on this filesystem.)
        return "refuse" if _pid_alive(holder.pid) and holder.pid != me.pid else "take"
    # Another host: only the heartbeat is trustworthy.
    if age is not None and age <= stale_after_s:
        return "refuse"
    return "take"


def _refusal(directory: Path, holder: LockHolder | None, job: str, stale_after_s: float) -> str:
    who = holder.describe() if holder else "another process (its record is not written yet)"
    return (
        f"checkpoint directory {directory} is locked by {who}; this job is {job!r}. Two jobs "
        "must not write the same checkpoint directory: give this run its own checkpoint.dir, "
        "or stop the other job. A holder that died releases the lock by itself (same host: at "
        f"once; another host: after its heartbeat is {stale_after_s:.0f} s old). If you are sure "
        f"no job writes here, delete {directory / RECORD_FILE}."
    )
