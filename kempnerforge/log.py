"""The library's progress lines: one channel, visible by default, printed once, by rank 0.

A library must not configure logging for its user, yet "resumed from step 12" has to be seen
even in a script that never called ``logging.basicConfig``. So progress goes to its own logger,
``kempnerforge.progress``, which has its own level (INFO) and a default handler that prints to
stderr in one format::

    kempnerforge rank 0 12:03:04: resumed from step 12 (runs/x/checkpoints/step_12)

The default handler decides at each line whether it is needed: when any other handler would
receive the record (the root handlers of ``logging.basicConfig``, a test runner's capture, a
handler on ``kempnerforge``), it stays silent and the line appears once, through the user's
handlers and format. Configuring logging before or after importing ``kempnerforge`` is the same.

Only rank 0 prints (the rank comes from :class:`kempnerforge.job.JobEnvironment`: ``RANK`` /
``WORLD_SIZE``, else ``SLURM_PROCID`` / ``SLURM_NTASKS``). Other ranks' lines are DEBUG records,
which the channel's level drops; ``logging.getLogger("kempnerforge.progress").setLevel(
logging.DEBUG)`` shows them. After :func:`quiet`, or with ``KEMPNERFORGE_QUIET=1``, no line is
logged at all, on any rank and at any level. The package's other loggers keep the standard
library's behaviour.

Torch-free and importable before anything else of the package: ``import kempnerforge`` installs
the handler.
"""

from __future__ import annotations

import logging
import os
import sys

CHANNEL = "kempnerforge.progress"
QUIET_ENV = "KEMPNERFORGE_QUIET"
FORMAT = "kempnerforge rank %(kempnerforge_rank)s %(asctime)s: %(message)s"
DATEFMT = "%H:%M:%S"

_RANK_FIELD = "kempnerforge_rank"
_MARK = "_kempnerforge_default_handler"
_OFF = ("", "0", "false", "no", "off")

_logger = logging.getLogger(CHANNEL)
_quiet = False


def progress(msg: str, *args: object) -> None:
    """One progress line (``%``-style arguments, as in :mod:`logging`) on the progress channel:
    INFO on rank 0, DEBUG on the others, nothing when quiet."""
    if is_quiet():
        return
    rank = _rank()
    level = logging.INFO if rank == 0 else logging.DEBUG
    _logger.log(level, msg, *args, extra={_RANK_FIELD: rank}, stacklevel=2)


def quiet(on: bool = True) -> None:
    """Silence progress lines in this process (``on=False`` brings them back, unless
    ``KEMPNERFORGE_QUIET`` is set)."""
    global _quiet
    _quiet = on


def is_quiet() -> bool:
    return _quiet or os.environ.get(QUIET_ENV, "").strip().lower() not in _OFF


def install_default_handler() -> None:
    """Give the progress channel its level and default handler, once (idempotent). A level the
    user set on the channel before is kept."""
    if _logger.level == logging.NOTSET:
        _logger.setLevel(logging.INFO)
    if not any(getattr(h, _MARK, False) for h in _logger.handlers):
        _logger.addHandler(_DefaultHandler())


def _rank() -> int:
    """This process's global rank, read when the line is logged (a launcher sets it before)."""
    from kempnerforge.job import JobEnvironment  # stdlib only; loaded at the first line

    try:
        return JobEnvironment.from_env().rank
    except ValueError:  # a malformed variable: setup will say so; a progress line must not fail
        return 0


class _Formatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(FORMAT, DATEFMT)

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, _RANK_FIELD):  # logged on the channel without progress()
            setattr(record, _RANK_FIELD, _rank())
        return super().format(record)


class _DefaultHandler(logging.Handler):
    """Prints to the current ``sys.stderr`` unless another handler will print the record."""

    _kempnerforge_default_handler = True  # found again by install_default_handler

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_Formatter())

    def emit(self, record: logging.LogRecord) -> None:
        if self._someone_else_prints(record):
            return
        stream = sys.stderr
        if stream is None:  # pythonw, or stderr closed
            return
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _someone_else_prints(self, record: logging.LogRecord) -> bool:
        """Whether a handler other than this one receives the record: on its logger or, while
        propagation goes on, any ancestor's. Handlers that print nothing do not count."""
        node: logging.Logger | None = logging.getLogger(record.name)
        while node is not None:
            for h in node.handlers:
                if h is self or isinstance(h, logging.NullHandler):
                    continue
                if record.levelno >= h.level:
                    return True
            if not node.propagate:
                return False
            node = node.parent  # type: ignore[assignment]
        return False
