"""Pass signals from a launcher to the processes of its tasks without losing one.

A task starts with the relayed signals ignored, so a signal that comes while it is still importing
(before its handler is installed) cannot kill it. Ignoring alone would lose that signal, so the
relay holds it: it watches ``/proc/<pid>/status`` (``SigCgt``, the caught-signal mask) and
delivers the signal once the process has a handler for it.

Which processes get a signal: every process in the tree under a task's pid, as SLURM does for the
processes of a step. A process that catches the signal, or has it at its default action, gets it
at once; one that ignores it is held until it installs a handler (or exits). With
``forward=False`` (a SLURM task: SLURM has already signalled every process of the step) only the
held case is delivered.

The Python handler only queues the signal number; one thread does the reading of ``/proc`` and the
``kill`` calls, so nothing heavy runs inside a handler and output from the launcher's own thread
is never re-entered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

CATCH, IGNORE, DEFAULT = "catch", "ignore", "default"

_POLL_S = 0.05  # how often a held signal is checked against the process's handlers


def signal_numbers(names: Iterable[str]) -> list[int]:
    """``["USR1", "SIGTERM"]`` -> their numbers, without duplicates; a bad name is a usage error."""
    out: list[int] = []
    for name in names:
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        num = getattr(signal, full, None)
        if not isinstance(num, int) or full.startswith("SIG_"):
            raise SystemExit(f"unknown signal {name!r}: use a name like USR1 or SIGTERM")
        if int(num) not in out:
            out.append(int(num))
    return out


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def disposition(pid: int, sig: int) -> str | None:
    """``catch``, ``ignore`` or ``default`` for ``sig`` in process ``pid``; None if it is gone.

    A signal blocked without a handler counts as ignored: a task is started with the relayed
    signals blocked until it has them ignored (see :func:`command_ignoring`).
    """
    masks: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigIgn:", "SigCgt:", "SigBlk:")):
                    key, value = line.split(":", 1)
                    masks[key] = int(value.strip(), 16)
    except OSError:
        return None
    bit = 1 << (sig - 1)
    if masks.get("SigCgt", 0) & bit:
        return CATCH
    if (masks.get("SigIgn", 0) | masks.get("SigBlk", 0)) & bit:
        return IGNORE
    if _is_zombie(pid):
        return None
    return DEFAULT


def _is_zombie(pid: int) -> bool:
    stat = _read_stat(pid)
    return stat is None or stat[0] == "Z"


def _read_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of ``pid`` from /proc/<pid>/stat; the name field may hold spaces or ')'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    if len(fields) < 2:
        return None
    return fields[0], int(fields[1])


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants (one scan of /proc), root first."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [root]
    for name in entries:
        if not name.isdigit():
            continue
        stat = _read_stat(int(name))
        if stat is not None and stat[0] != "Z":
            children.setdefault(stat[1], []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class SignalRelay:
    """Hold and deliver signals to the process trees of a launcher's tasks.

    ``install(signals)`` makes the relay the handler of those signals in this process;
    ``request(sig)`` relays one signal as if it had arrived. ``on_signal`` is called, from the
    handler, with every signal that arrives and returns the signal to relay in its place (or
    None for none): the local launcher notes a cancel this way and relays it as SIGTERM. It runs
    inside a signal handler, so it must only set flags.
    """

    def __init__(self, forward: bool, on_signal: Callable[[int], int | None] | None = None) -> None:
        self.forward = forward
        self.on_signal = on_signal
        self._tasks: list[int] = []
        self._incoming: deque[int] = deque()
        self._held: list[tuple[int, int]] = []  # (pid, signal) waiting for a handler
        self._unsent: list[int] = []  # signals that came while there was no task
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------- setup
    def install(self, signals: Iterable[int]) -> None:
        self._ensure_thread()  # here, not first inside a (possibly nested) handler
        for sig in signals:
            signal.signal(sig, self._handler)

    def watch(self, pid: int) -> None:
        with self._lock:
            if pid not in self._tasks:
                self._tasks.append(pid)
        self._resend_unsent()

    def set_tasks(self, pids: Iterable[int]) -> None:
        """The tasks of the current run. A signal that came while there were none (before the
        first task started, or between two runs) goes to the next ones."""
        with self._lock:
            self._tasks = list(pids)
            self._held = []
        self._resend_unsent()

    def _resend_unsent(self) -> None:
        with self._lock:
            if not self._tasks or not self._unsent:
                return
            self._incoming.extend(self._unsent)
            self._unsent.clear()
        self._wake.set()

    # ----------------------------------------------------------------------------- delivery
    def _handler(self, signum: int, _frame: Any = None) -> None:
        sig: int | None = signum
        if self.on_signal is not None:
            sig = self.on_signal(signum)
        if sig is not None:
            self.request(sig)

    def request(self, sig: int) -> None:
        """Relay ``sig`` to every task (safe to call from a signal handler)."""
        self._incoming.append(sig)
        self._ensure_thread()
        self._wake.set()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="signal-relay", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(_POLL_S if self._held else None)
            self._wake.clear()
            while self._incoming:
                self._dispatch(self._incoming.popleft())
            self._deliver_held()

    def _dispatch(self, sig: int) -> None:
        with self._lock:
            tasks = list(self._tasks)
            if not tasks:
                if sig not in self._unsent:
                    self._unsent.append(sig)
                return
        sent, held = 0, 0
        for task in tasks:
            for pid in process_tree(task):
                state = disposition(pid, sig)
                if state is None:
                    continue
                if state == IGNORE:
                    with self._lock:
                        if (pid, sig) not in self._held:
                            self._held.append((pid, sig))
                    held += 1
                elif self.forward:
                    _kill(pid, sig)
                    sent += 1
        logger.debug(
            "%s: sent to %d process(es), held for %d until they handle it",
            signal_name(sig),
            sent,
            held,
        )

    def _deliver_held(self) -> None:
        with self._lock:
            held = list(self._held)
        keep = []
        for pid, sig in held:
            state = disposition(pid, sig)
            if state == IGNORE:
                keep.append((pid, sig))
            elif state is not None:  # it installed a handler (or reset to default): deliver
                _kill(pid, sig)
                logger.debug("%s delivered to %d once it could handle it", signal_name(sig), pid)
        with self._lock:
            self._held = [h for h in self._held if h in keep or h not in held]


def command_ignoring(signals: Iterable[int], command: list[str], python: str) -> list[str]:
    """``command`` wrapped so that it starts with ``signals`` ignored.

    An ignored disposition survives ``exec``, so a tiny interpreter sets it and execs the
    command. Done this way rather than with ``preexec_fn``, which is not safe in a process that
    runs threads (the relay and the log readers do). Start it with :func:`blocked` around the
    ``Popen``: until the interpreter has them ignored the signals stay blocked (a blocked mask
    is inherited), and the relay holds them meanwhile.
    """
    nums = ",".join(str(s) for s in signals)
    return [python, "-S", "-c", _EXEC_IGNORING, nums, *command]


@contextlib.contextmanager
def blocked(signals: Iterable[int]) -> Iterator[None]:
    """Block ``signals`` in this thread for the duration (they are delivered afterwards)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, list(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_EXEC_IGNORING = (
    "import os, signal, sys\n"
    "sigs = [int(s) for s in sys.argv[1].split(',') if s]\n"
    "for s in sigs:\n"
    "    signal.signal(s, signal.SIG_IGN)\n"
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e:\n"
    "    sys.stderr.write(f'kempnerforge.launch: cannot run {sys.argv[2]!r}: {e.strerror}\\n')\n"
    "    sys.exit(127)\n"
)
