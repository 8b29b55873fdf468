"""Scalars per step to TensorBoard and Weights & Biases, one run for a whole job across restarts.

A preempted or crashed job is restarted from its last checkpoint and computes the steps after it
again. :class:`MetricsLogger` keeps what the dashboards show equal to what one uninterrupted run
would have logged:

* TensorBoard: one event directory, ``<out_dir>/tb``, for every run of the job. Each run opens
  its writer with ``purge_step = resume_step + 1``, which writes a ``SessionLog.START`` event;
  TensorBoard's reader drops every earlier event at or past that step, so a step redone after a
  crash appears once (torch's event files carry a file version for which TensorBoard does not
  drop out-of-order steps by itself). The scalars of one ``log()`` call are one event.
* W&B: one run, its id derived from ``run_id`` (see :func:`stable_run_id`), opened with
  ``resume="allow"``, files under ``<out_dir>/wandb``. The step is a logged value (``step``,
  the charts' x axis through ``define_metric``), so every ``log()`` call is a row committed at
  once and nothing waits for the next step. ``offline`` needs no network (``wandb sync`` later).
  W&B runs in a thread of its own: importing it, ``wandb.init`` (bounded by
  ``wandb_init_timeout_s``), logging and ``finish`` never block the caller. When it cannot be
  imported or a call fails, one warning says so and W&B is off for the rest of the run.

Durability: ``flush()`` hands TensorBoard's queued events to the file (one write per event, so
they survive the process being killed). W&B 0.x has no public flush: its service writes the
offline ``.wandb`` file in 32 KiB blocks and flushes a partial block on a timer, which this
module sets to :data:`WANDB_FLUSH_INTERVAL_S`; rows reach the file within that time, and
``close()`` (``run.finish()``) writes the rest. Call ``flush()`` before a checkpoint can commit
(the trainer does at every step, before ``maybe_save``) and ``close()`` before the process
exits, including before ``os._exit``.

Only rank 0 writes; on other ranks every call does nothing. TensorBoard and W&B are optional
dependencies (``pip install 'kempnerforge[metrics]'``): this module imports neither until a
logger needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WANDB_MODES = ("disabled", "offline", "online")
WANDB_FLUSH_INTERVAL_S = 0.5  # W&B's service flushes its .wandb file this often
RUN_ID_FILE = "run_id"
TB_DIR = "tb"
WANDB_DIR = "wandb"
_WANDB_QUEUE = 100_000  # rows held while wandb.init runs; more are dropped (one warning)
_WANDB_CLOSE_S = 15.0  # close() waits this long for W&B to finish, then leaves it behind
_WANDB_INIT_AT_CLOSE_S = 5.0  # ... and this long for a wandb.init still running
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class MetricsConfig:
    """The ``logging`` section: where the per-step scalars go besides ``metrics.jsonl``."""

    tensorboard: bool = True  # event files under <dir>/tb
    wandb: str = "disabled"  # disabled | offline (no network; `wandb sync` later) | online
    wandb_project: str | None = None  # None: W&B's default project
    wandb_name: str | None = None  # display name; the run id is stable_run_id(dir)
    wandb_init_timeout_s: float = 60.0  # wandb.init gives up after this (in the background)
    dir: str = ""  # empty: <output_dir>

    def __post_init__(self) -> None:
        if self.wandb not in WANDB_MODES:
            raise ValueError(
                f"logging.wandb must be one of {list(WANDB_MODES)}, got {self.wandb!r}"
            )
        if self.wandb_init_timeout_s <= 0:
            raise ValueError(
                f"logging.wandb_init_timeout_s must be > 0, got {self.wandb_init_timeout_s}"
            )

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.wandb != "disabled"


def stable_run_id(out_dir: str | os.PathLike[str]) -> str:
    """The id of the job writing into ``out_dir``: read from ``<out_dir>/run_id``, or made and
    stored there at the first start. Every restart of the job (a requeue, a relaunch of the same
    command) finds the same id, so W&B continues one run. Write your own id into the file
    before the first start to choose it; delete the file to start a new W&B run."""
    path = Path(out_dir) / RUN_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text().strip()
        if text:
            return text
    path.parent.mkdir(parents=True, exist_ok=True)
    new = uuid.uuid4().hex[:16]
    tmp = path.with_name(f".{RUN_ID_FILE}.{os.getpid()}.tmp")
    tmp.write_text(new + "\n")
    try:
        os.link(tmp, path)  # fails if another process stored one first: use theirs
    except FileExistsError:
        return path.read_text().strip() or new
    finally:
        tmp.unlink(missing_ok=True)
    return new


def wandb_id(run_id: str) -> str:
    """The W&B run id for ``run_id``: itself when W&B accepts it, else a hash of it."""
    if _SAFE_ID.match(run_id):
        return run_id
    return hashlib.sha256(run_id.encode()).hexdigest()[:16]


class MetricsLogger:
    """Per-step scalars to TensorBoard and/or W&B; one run for the whole job across restarts.

    ``out_dir``: TensorBoard writes ``<out_dir>/tb``, W&B ``<out_dir>/wandb``. ``resume_step``:
    the step the run resumed from (0 on a fresh start); TensorBoard drops what an earlier run
    of the job logged past it. ``run_id``: the job's id, the same on every restart (None:
    :func:`stable_run_id` of ``out_dir``). ``wandb``: ``"disabled"``, ``"offline"`` or
    ``"online"``; ``project``, ``name``: the W&B project and display name; ``config``: a mapping
    W&B stores as the run's config. Only ``rank`` 0 writes.

    ``log(step, loss=..., lr=...)`` once or more per step (steps ascending), ``flush()`` before
    a checkpoint can commit, ``close()`` before the process exits (also a context manager).
    Neither backend can stop training: a failure is one warning and that backend is off.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        resume_step: int,
        run_id: str | None = None,
        tensorboard: bool = True,
        wandb: str = "disabled",
        project: str | None = None,
        name: str | None = None,
        rank: int = 0,
        config: Mapping[str, Any] | None = None,
        wandb_init_timeout_s: float = 60.0,
    ) -> None:
        if wandb not in WANDB_MODES:
            raise ValueError(f"wandb must be one of {list(WANDB_MODES)}, got {wandb!r}")
        self.out_dir = Path(out_dir)
        self.rank = int(rank)
        self.resume_step = int(resume_step)
        self._tb: _TensorBoard | None = None
        self._wb: _WandbThread | None = None
        self.run_id = ""
        if self.rank != 0:
            return
        if wandb != "disabled":
            self.run_id = run_id if run_id else stable_run_id(self.out_dir)
            self._wb = _WandbThread(
                self.out_dir,
                wandb_id(self.run_id),
                wandb,
                project,
                name,
                dict(config) if config else None,
                wandb_init_timeout_s,
            )
        if tensorboard:
            self._tb = _TensorBoard.open(self.out_dir / TB_DIR, self.resume_step + 1)

    @classmethod
    def from_config(
        cls,
        cfg: MetricsConfig,
        *,
        resume_step: int,
        rank: int = 0,
        config: Mapping[str, Any] | None = None,
    ) -> MetricsLogger:
        """The logger a job's ``logging`` section describes (``load_config`` sets ``cfg.dir``)."""
        if not cfg.dir:
            raise ValueError("logging.dir is empty: set it (JobConfig fills <output_dir>)")
        return cls(
            cfg.dir,
            resume_step=resume_step,
            tensorboard=cfg.tensorboard,
            wandb=cfg.wandb,
            project=cfg.wandb_project,
            name=cfg.wandb_name,
            rank=rank,
            config=config,
            wandb_init_timeout_s=cfg.wandb_init_timeout_s,
        )

    @property
    def active(self) -> bool:
        """Something is written (rank 0 with a backend still on)."""
        return (self._tb is not None and self._tb.ok) or (self._wb is not None and self._wb.ok)

    def log(self, step: int, **scalars: float | None) -> None:
        """Record ``scalars`` (name=value; None values are skipped) at ``step``."""
        if self.rank != 0:
            return
        values = {k: float(v) for k, v in scalars.items() if v is not None}
        if not values:
            return
        if self._tb is not None:
            self._tb.log(int(step), values)
        if self._wb is not None:
            self._wb.log(int(step), values)

    def flush(self) -> None:
        """TensorBoard's pending events into the file (returns when written); W&B's rows are
        handed over as logged and reach its file within :data:`WANDB_FLUSH_INTERVAL_S`."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close both; W&B's ``finish`` is waited for at most a few seconds.
        Calling it again does nothing."""
        tb, self._tb = self._tb, None
        wb, self._wb = self._wb, None
        if tb is not None:
            tb.close()
        if wb is not None:
            wb.close(_WANDB_CLOSE_S)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- TensorBoard


class _TensorBoard:
    """torch's SummaryWriter on one directory; off (after one warning) at the first failure."""

    def __init__(self, writer: Any, summary_pb2: Any) -> None:
        self._writer = writer
        self._pb = summary_pb2
        self.ok = True

    @classmethod
    def open(cls, log_dir: Path, purge_step: int) -> _TensorBoard | None:
        try:
            from tensorboard.compat.proto import summary_pb2
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            logger.warning(
                "metrics: TensorBoard logging is off: %s. Install it (pip install "
                "'kempnerforge[metrics]' or tensorboard), or set logging.tensorboard=false.",
                e,
            )
            return None
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            _after_last_event_file(log_dir)
            writer = SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=10)
        except Exception as e:
            logger.warning("metrics: TensorBoard logging is off: cannot open %s: %r", log_dir, e)
            return None
        return cls(writer, summary_pb2)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.ok:
            return
        try:
            summary = self._pb.Summary(
                value=[self._pb.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
            )
            self._writer.file_writer.add_summary(summary, step)
        except Exception as e:
            self._fail(e)

    def flush(self) -> None:
        if self.ok:
            try:
                self._writer.flush()
            except Exception as e:
                self._fail(e)

    def close(self) -> None:
        if self.ok:
            try:
                self._writer.close()
            except Exception as e:
                self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.ok = False
        logger.warning("metrics: TensorBoard logging is off for the rest of this run: %r", e)
        with contextlib.suppress(Exception):
            self._writer.close()


def _after_last_event_file(log_dir: Path, max_wait_s: float = 2.0) -> None:
    """TensorBoard reads a directory's event files in name order, and the name starts with the
    creation time in whole seconds. A restart within the same second as the previous writer
    could sort before it, and its purge would come first; wait for the next second instead."""
    newest = 0
    for p in log_dir.glob("events.out.tfevents.*"):
        parts = p.name.split(".")
        if len(parts) > 3 and parts[3].isdigit():
            newest = max(newest, int(parts[3]))
    wait = newest + 1 - time.time()
    if wait > max_wait_s:
        logger.warning(
            "metrics: %s has an event file from %.0f s in the future (clock skew?); "
            "TensorBoard may order this run's events before it",
            log_dir,
            wait,
        )
    elif wait > 0:
        time.sleep(wait)


# --------------------------------------------------------------------------- W&B


_CLOSE = object()


class _WandbThread:
    """W&B in a daemon thread: import, init, log and finish happen there, in order, so the
    training loop only enqueues. Any failure: one warning, then every call does nothing."""

    def __init__(
        self,
        out_dir: Path,
        run_id: str,
        mode: str,
        project: str | None,
        name: str | None,
        config: dict[str, Any] | None,
        init_timeout_s: float,
    ) -> None:
        self.ok = True
        self._warned = False
        self._ready = threading.Event()  # wandb.init returned a run
        self._queue: queue.Queue[Any] = queue.Queue(_WANDB_QUEUE)
        self._init = {
            "dir": str(out_dir),
            "id": run_id,
            "mode": mode,
            "project": project,
            "name": name,
            "config": config,
            "timeout": init_timeout_s,
        }
        self._thread = threading.Thread(target=self._main, name="kempnerforge-wandb", daemon=True)
        self._thread.start()

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.ok:
            return
        try:
            self._queue.put_nowait((step, values))
        except queue.Full:
            self._fail(f"more than {_WANDB_QUEUE} rows waiting for W&B (wandb.init still running?)")

    def close(self, timeout_s: float) -> None:
        """Let the thread finish the run. A ``wandb.init`` still running (a slow start, a server
        that does not answer) is waited for a few seconds only: a stop must not spend its grace
        time on W&B."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(_CLOSE, timeout=1.0)
        if not self._ready.wait(_WANDB_INIT_AT_CLOSE_S) and self._thread.is_alive():
            self._fail(
                f"wandb.init had not finished {_WANDB_INIT_AT_CLOSE_S:.0f} s after the run ended; "
                "this run's points are not in W&B"
            )
            _no_wait_at_exit()
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._fail(f"W&B did not finish within {timeout_s:.0f} s; leaving it behind")
            _no_wait_at_exit()

    def _fail(self, why: str) -> None:
        self.ok = False
        if not self._warned:
            self._warned = True
            logger.warning("metrics: W&B logging is off for the rest of this run: %s", why)

    def _main(self) -> None:
        run = None
        try:
            run = self._start()
            if run is None:
                return
            self._ready.set()
            skip_to = self._logged_before(run)
            while True:
                item = self._queue.get()
                if item is _CLOSE:
                    break
                if not self.ok:
                    continue
                step, values = item
                if skip_to is not None and step <= skip_to:
                    continue  # logged by an earlier run of the job (online resume)
                try:
                    run.log({**values, "step": step})
                except Exception as e:
                    self._fail(f"run.log raised {e!r}")
        finally:
            if run is not None:
                try:
                    run.finish()
                except Exception as e:
                    self._fail(f"run.finish raised {e!r}")
            self.ok = False

    def _start(self) -> Any:
        try:
            import wandb
        except Exception as e:  # not installed, or broken: ImportError and more
            self._fail(f"cannot import wandb ({e!r}); pip install 'kempnerforge[metrics]'")
            return None
        a = self._init
        try:
            Path(a["dir"]).mkdir(parents=True, exist_ok=True)
            settings = _settings(wandb, a["timeout"])
            run = wandb.init(
                project=a["project"],
                name=a["name"],
                id=a["id"],
                resume="allow",
                mode=a["mode"],
                dir=a["dir"],
                config=a["config"],
                settings=settings,
            )
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
        except BaseException as e:  # wandb raises its own errors, some not Exceptions
            self._fail(f"wandb.init failed ({e!r})")
            return None
        return run

    @staticmethod
    def _logged_before(run: Any) -> int | None:
        """The last step an earlier run of this job logged, when W&B knows it (online resume):
        rows up to it are the steps redone after a crash, with the values W&B already has."""
        try:
            if not run.resumed:
                return None
            last = run.summary.get("step")
            return int(last) if last is not None else None
        except Exception:
            return None


def _settings(wandb: Any, init_timeout_s: float) -> Any:
    """W&B's settings for a run of the job. The flush interval of the offline file is a newer
    setting: with a W&B that lacks it, its default (or a full block) applies."""
    base = {
        "init_timeout": init_timeout_s,
        "silent": True,
        "console": "off",  # the job's own stdout/stderr stay as they are
    }
    try:
        return wandb.Settings(**base, x_transaction_log_flush_interval=WANDB_FLUSH_INTERVAL_S)
    except Exception as e:
        logger.debug("metrics: W&B without a transaction log flush interval (%r)", e)
        return wandb.Settings(**base)


def _no_wait_at_exit() -> None:
    """W&B registers an exit hook that waits for its service process, which may go on retrying
    an init for up to its timeout. When we leave W&B behind, drop that hook (through W&B's
    internals: there is no public way); the service ends by itself when this process does.
    Without it, a normal interpreter exit waits for the service; ``os._exit`` never does."""
    try:
        from wandb.sdk import wandb_setup

        conn = wandb_setup._singleton._connection if wandb_setup._singleton else None
        if conn is not None and conn._cleanup is not None:
            conn._cleanup()  # atexit.unregister(its teardown)
    except Exception as e:
        logger.debug("metrics: cannot drop W&B's exit hook: %r", e)
