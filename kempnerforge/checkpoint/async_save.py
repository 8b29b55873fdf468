"""How checkpoint bytes leave the device: synchronous, async, or async through pinned buffers.

``disabled``: ``dcp.save`` runs in the caller on the live tensors.

``async`` / ``async_with_pinned_mem``: the caller only *stages*: every tensor (the local shard of a
DTensor) is copied into a host buffer that is allocated once and reused by every later save (first
touch of fresh memory costs ~2.4 s/GiB; a copy into an existing buffer runs at memcpy speed). On
CUDA with ``async_with_pinned_mem`` those buffers are pinned and the copies are issued
``non_blocking`` on a side stream; ``save()`` does not wait for them: it records a CUDA event after
the copies and returns. The background thread waits on that event before writing, and whoever is
about to change the state (the manager's optimizer step pre-hook, ``wait_staged``) makes its stream
wait on it first, so the copy overlaps the next forward/backward. Host-to-host copies run in a
small pool of single-threaded copies balanced by bytes (one intra-op-parallel ``copy_`` per tensor
pays a fork/join each). A single background thread then runs ``dcp.save`` on a dedicated gloo
process group (thread-mode saves on the default group deadlock while training runs collectives)
followed by the caller's ``on_written`` step (train state, manifest, commit); DCP's file streams
hash what they write, so the manifest needs no second read. Each save first drains the previous
one and re-raises its failure.

A process forked from the saving one (a DataLoader worker) inherits the checkpointer's memory but
not its threads: there the checkpointer has nothing in flight, waits for nothing and refuses to
start an async save, and nothing waits for, joins or queues to the parent's thread.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import queue
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner

from kempnerforge.checkpoint.config import AsyncCheckpointMode
from kempnerforge.checkpoint.guards import describe_failure, diagnose_write_failure
from kempnerforge.checkpoint.storage import hashing_filesystem
from kempnerforge.checkpoint.writer import make_writer

logger = logging.getLogger(__name__)

# DCP warns on every single-process save/load even when asked for no_dist; we do that on purpose.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)

try:  # DTensor moved around between releases; staging works without it for plain tensors
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


class CheckpointError(RuntimeError):
    """A checkpoint save failed (possibly in the background); ``latest`` was not advanced."""


@dataclass
class SaveStats:
    """Figures of one save, as seen by this rank (the bench reads these).

    ``bytes``: tensor bytes of this rank's state; ``total_bytes``: bytes of every file of the step,
    all ranks (0 until committed); ``blocked_s``: time the caller spent inside ``save()``;
    ``staging_s``: part of it spent issuing the copies into host buffers (on CUDA with pinned
    buffers the copies may still run after ``save()`` returned); ``staged_s``: ``save()`` call to
    the copies being complete, as the background thread saw it; ``durable_s``: ``save()`` call to
    ``latest`` committed; ``gbps``: ``total_bytes`` (or ``bytes``) / ``durable_s`` / 1e9;
    ``new_host_bytes``: host memory newly allocated for staging (0 once buffers are reused).
    """

    step: int = -1
    mode: str = "disabled"
    bytes: int = 0
    total_bytes: int = 0
    blocked_s: float = 0.0
    staging_s: float = 0.0
    staged_s: float = 0.0
    durable_s: float = 0.0
    gbps: float = 0.0
    new_host_bytes: int = 0
    pinned: bool = False
    committed: bool = False
    path: str = ""

    @property
    def allocated_host_memory(self) -> bool:
        return self.new_host_bytes > 0


# ---------------------------------------------------------------------------------------------
# Staging
# ---------------------------------------------------------------------------------------------
_CHUNK_BYTES = 32 << 20  # host copies are split into pieces of at most this size
_POOL_MIN_BYTES = 16 << 20  # below this, one thread copies everything


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _one_thread() -> None:
    torch.set_num_threads(1)  # this pool thread's intra-op width only (OpenMP ICVs are per thread)


def _copy_bin(pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for dst, src in pieces:
        dst.copy_(src)


def balance(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], bins: int, chunk: int = _CHUNK_BYTES
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Split (dst, src) copies into ``bins`` lists of about equal bytes.

    Contiguous tensors larger than ``chunk`` are cut into flat pieces first, so one big tensor
    does not leave the other threads idle; then the largest piece goes to the emptiest bin.
    """
    pieces: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for dst, src in pairs:
        n = _nbytes(dst)
        if n > chunk and dst.is_contiguous() and src.is_contiguous() and dst.dim() > 0:
            d, s_ = dst.view(-1), src.reshape(-1)
            step = max(1, chunk // dst.element_size())
            for a in range(0, d.numel(), step):
                pieces.append(
                    (
                        min(step, d.numel() - a) * dst.element_size(),
                        d[a : a + step],
                        s_[a : a + step],
                    )
                )
        else:
            pieces.append((n, dst, src))
    pieces.sort(key=lambda p: p[0], reverse=True)
    loads = [0] * bins
    out: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(bins)]
    for n, dst, src in pieces:
        i = loads.index(min(loads))
        loads[i] += n
        out[i].append((dst, src))
    return [b for b in out if b]


@dataclass
class _Copies:
    """The copies one ``stage`` call collects: device-to-pinned-host ones are issued together."""

    device: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    host: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]], non_blocking: bool) -> None:
    """(dst, src) copies in one call where torch has a list copy (no Python step per tensor)."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        foreach([d for d, _ in pairs], [s_ for _, s_ in pairs], non_blocking=non_blocking)
        return
    for dst, src in pairs:  # pragma: no cover - torch without _foreach_copy_
        dst.copy_(src, non_blocking=non_blocking)


class HostStager:
    """Copies a (nested) state dict into host buffers kept between saves.

    Buffers are keyed by the value's path in the state dict and (shape, dtype); a key whose shape
    or dtype changes gets a new buffer (counted in ``new_host_bytes``). DTensors keep their
    sharding spec and get the host buffer as local tensor, so DCP plans the same shards it would
    plan for the live state. Non-tensor leaves (param-group hyperparameters, ints) are copied.

    With ``pinned`` on CUDA, device tensors are copied ``non_blocking`` on a side stream (which
    first waits for the current stream); each source is ``record_stream``-ed so the allocator
    cannot reuse a temporary before the copy read it. ``stage(..., sync=False)`` returns the CUDA
    event recorded after those copies instead of waiting: the caller must make anything that
    mutates the sources wait on it. Host sources are copied by ``copy_threads`` single-threaded
    copies balanced by bytes.
    """

    def __init__(self, pinned: bool, copy_threads: int | None = None) -> None:
        self.pinned = pinned
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._stream: Any = None
        self.copy_threads = copy_threads or min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self.last_event: Any = None

    @property
    def _pin(self) -> bool:
        """Pinned buffers and deferred copies: asked for, and possible here."""
        return self.pinned and torch.cuda.is_available()

    def host_bytes(self) -> int:
        return sum(_nbytes(b) for b in self._buffers.values())

    def allocate(self, state_dict: dict[str, Any]) -> int:
        """Allocate (and pin) the buffers ``stage`` would need, copying nothing; returns the new
        bytes. Lets the one-off allocation happen off the training loop's critical path."""
        counters = [0, 0]
        self._walk(state_dict, (), counters, None)
        return counters[1]

    def stage(
        self, state_dict: dict[str, Any], sync: bool = True
    ) -> tuple[dict[str, Any], int, int]:
        """Returns (staged state dict, tensor bytes staged, bytes newly allocated).

        With ``sync=False`` the device-to-host copies may still be running; ``self.last_event``
        is then the CUDA event that completes with them (None when everything is done).
        """
        counters = [0, 0]
        self.last_event = None
        sink = _Copies()
        staged = self._walk(state_dict, (), counters, sink)
        event = None
        if sink.device:
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            side = self._stream
            side.wait_stream(torch.cuda.current_stream())  # copies see finished optimizer math
            with torch.cuda.stream(side):
                _copy_all(sink.device, non_blocking=True)
            for _, src in sink.device:
                src.record_stream(side)  # a temporary source is not reused before the copy read it
            event = torch.cuda.Event()
            event.record(side)
        self._copy_host(sink.host)
        if event is not None:
            if sync:
                event.synchronize()  # buffers are complete, sources may change again
            else:
                self.last_event = event
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return staged, counters[0], counters[1]

    def _walk(self, obj: Any, path: tuple, counters: list[int], sink: _Copies | None) -> Any:
        if isinstance(obj, dict):
            return {k: self._walk(v, (*path, k), counters, sink) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._walk(v, (*path, i), counters, sink) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(self._walk(v, (*path, i), counters, sink) for i, v in enumerate(obj))
        if DTensor is not None and isinstance(obj, DTensor):
            local = self._copy(obj._local_tensor, path, counters, sink)
            return _wrap_like(obj, local) if sink is not None else None
        if isinstance(obj, torch.Tensor):
            return self._copy(obj, path, counters, sink)
        return copy.deepcopy(obj) if sink is not None else None

    def _copy(
        self, src: torch.Tensor, path: tuple, counters: list[int], sink: _Copies | None
    ) -> torch.Tensor:
        src = src.detach()
        buf = self._buffers.get(path)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=self._pin)
            self._buffers[path] = buf
            counters[1] += _nbytes(buf)
        if sink is None:  # allocate only
            return buf
        if src.is_cuda and self._pin:
            sink.device.append((buf, src))  # issued together, non_blocking, on the side stream
        elif src.is_cuda:
            buf.copy_(src)  # pageable: synchronous, on the caller's stream
        else:
            sink.host.append((buf, src))
        counters[0] += _nbytes(buf)
        return buf

    def _copy_host(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        total = sum(_nbytes(d) for d, _ in pairs)
        if self.copy_threads <= 1 or total < _POOL_MIN_BYTES or len(pairs) == 0:
            _copy_bin(pairs)
            return
        if self._pool is None:
            prev = torch.get_num_threads()
            self._pool = ThreadPoolExecutor(
                self.copy_threads, thread_name_prefix="kempnerforge-stage", initializer=_one_thread
            )
            # start every worker now (the barrier keeps each one busy until all exist), then
            # restore the process-wide default that their initializers changed
            barrier = threading.Barrier(self.copy_threads)
            list(self._pool.map(lambda _: barrier.wait(), range(self.copy_threads)))
            torch.set_num_threads(prev)
        bins = balance(pairs, self.copy_threads)
        for f in [self._pool.submit(_copy_bin, b) for b in bins]:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _wrap_like(dt: Any, local: torch.Tensor) -> Any:
    """A DTensor with ``dt``'s global shape/sharding whose local shard is ``local`` (host)."""
    try:
        return DTensor(local, dt._spec, requires_grad=False)
    except Exception:  # older constructors: do what torch's own CPU staging does
        ret = dt.detach().to("cpu") if dt.device.type != "cpu" else copy.copy(dt.detach())
        ret._local_tensor = local
        return ret


# ---------------------------------------------------------------------------------------------
# Background worker
# ---------------------------------------------------------------------------------------------
class _Worker:
    """One daemon thread running jobs in order; each job's outcome lands in a Future.

    A daemon thread (not a ThreadPoolExecutor) so a save stuck in a collective cannot block
    interpreter exit; callers that need durability call ``wait()`` (the contract says so).

    ``stop()`` joins the thread. It must not still be running Python code when the interpreter
    finalizes: a daemon thread that reacquires the GIL then is ended with ``pthread_exit``, whose
    forced unwind aborts the process ("terminate called without an active exception") when it
    meets a C++ frame, e.g. torch freeing a tensor with the GIL released. That is what freeing
    the last job's closure (it holds the staged state dict) did after a run had returned.
    """

    def __init__(self, name: str) -> None:
        self._pid = os.getpid()  # a forked child has a copy of this object, not the thread
        self._q: queue.Queue = queue.Queue()
        self._t = threading.Thread(target=self._run, name=name, daemon=True)
        self._t.start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"background thread {self._t.name} belongs to process {self._pid}; a process "
                "forked from it cannot run work on it"
            )
        fut: Future = Future()
        self._q.put((fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            fn, fut = self._q.get()
            if fn is None:
                return
            ok, value = True, None
            try:
                value = fn()
            except BaseException as e:  # DCP's CheckpointException is a BaseException
                ok, value = False, e
            # Free the job (its closure holds the staged tensors) before the caller hears back,
            # so nothing is left for this thread to free once the caller moved on.
            del fn
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
            del fut, value

    def stop(self, timeout: float | None = 60.0) -> bool:
        """End the thread after the jobs already queued; wait up to ``timeout`` s for it to end.

        ``timeout=0`` does not wait (a preempted job on its way out through ``os._exit``).
        Returns whether the thread has ended. In a forked child there is no thread to end (and
        the queue may be locked by the parent's thread at fork): nothing is touched.
        """
        if os.getpid() != self._pid:
            return True
        self._q.put((None, None))
        if timeout == 0:
            return not self._t.is_alive()
        self._t.join(timeout)
        if self._t.is_alive():
            logger.warning("background thread %s did not end within %ss", self._t.name, timeout)
            return False
        return True


def gloo_group_like(process_group: Any | None) -> Any | None:
    """A new gloo group with the ranks of ``process_group`` (None = world); None without dist.

    ``new_group`` is collective over the world, and pipeline stages pass different groups, so
    every rank first learns every rank's wanted members and all groups are created in one order.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if process_group is None:
        return dist.new_group(backend="gloo")
    mine = tuple(dist.get_process_group_ranks(process_group))
    wanted: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(wanted, mine)
    ours = None
    for ranks in sorted(set(map(tuple, wanted))):
        g = dist.new_group(ranks=list(ranks), backend="gloo")
        if ranks == mine:
            ours = g
    return ours


# ---------------------------------------------------------------------------------------------
# AsyncCheckpointer
# ---------------------------------------------------------------------------------------------
class Rank0ReplicasPlanner(DefaultSavePlanner):
    """DCP's save planner, except that the entries named in ``from_rank0`` are written from
    the coordinator's (rank 0's) copy.

    DCP writes a replicated (non-DTensor) tensor once, from whichever rank holds the smallest
    plan. That is right when every rank holds the same bytes, but BatchNorm running statistics
    under DDP (and any plain buffer under FSDP2) differ between ranks between forwards, and DDP
    broadcasts rank 0's buffers at the next forward: rank 0's copy is the one an uninterrupted
    run continues from. Keys are flattened state-dict keys (``model.bn.running_mean``).
    """

    def __init__(self, from_rank0: frozenset[str] = frozenset(), **kw: Any) -> None:
        super().__init__(**kw)
        self.from_rank0 = from_rank0

    def _dedup_save_plans(self, all_plans: list[Any]) -> list[Any]:
        if self.from_rank0 and len(all_plans) > 1:
            all_plans = [all_plans[0]] + [
                dataclasses.replace(
                    plan, items=[i for i in plan.items if i.index.fqn not in self.from_rank0]
                )
                for plan in all_plans[1:]
            ]
        return super()._dedup_save_plans(all_plans)


class AsyncCheckpointer:
    """Non-blocking checkpoint saver; each new save waits for the previous one first.

    ``save(state_dict, checkpoint_id, process_group)`` writes a DCP checkpoint to
    ``checkpoint_id``. ``on_written`` (keyword, optional) runs after DCP finished, in the same
    thread (the background one in async modes), with ``dcp_group``, the group DCP used; the
    manager uses it to write its train state and commit. Failures of a background save surface
    as :class:`CheckpointError` at the next ``save()`` or ``wait()``.
    """

    def __init__(
        self,
        mode: AsyncCheckpointMode = AsyncCheckpointMode.disabled,
        *,
        writer_threads: int = 4,
        copy_threads: int | None = None,
        writer_kind: str = "staged",
    ) -> None:
        self.mode = AsyncCheckpointMode(mode)
        self.writer_threads = writer_threads
        self.writer_kind = writer_kind
        self.pinned = self.mode is AsyncCheckpointMode.async_pinned and torch.cuda.is_available()
        if self.mode is AsyncCheckpointMode.async_pinned and not self.pinned:
            logger.info(
                "async_with_pinned_mem without CUDA: staging into plain reused host buffers (as 'async')"
            )
        self._stager = (
            HostStager(pinned=self.pinned, copy_threads=copy_threads) if self.is_async else None
        )
        self._copy_event: Any = None  # CUDA event of the last save's copies, until waited on
        self._worker: _Worker | None = None
        self._pending: Future | None = None
        self._pending_desc = ""
        self._groups: dict[Any, Any] = {}
        self._uid = uuid.uuid4().hex[:12]
        self._pid = os.getpid()
        self.last_stats = SaveStats()

    @property
    def is_async(self) -> bool:
        return self.mode is not AsyncCheckpointMode.disabled

    def _forked(self) -> bool:
        """True in a process forked from the one that made this checkpointer."""
        return os.getpid() != self._pid

    @property
    def is_pending(self) -> bool:
        """A save (or buffer allocation) is still running: ``wait()`` would block.

        A save that finished is not pending, even before ``wait()`` collected its outcome (a
        failure is raised there, see :attr:`unreported_failure`).
        """
        fut = self._pending
        if fut is None or self._forked():  # the child has no thread that could finish it
            return False
        return not fut.done()

    @property
    def unreported_failure(self) -> BaseException | None:
        """The error of a save that finished but was not waited for yet (``wait()`` and the
        next ``save()`` raise it), else None. Never blocks."""
        fut = self._pending
        if fut is None or self._forked() or not fut.done():
            return None
        return fut.exception()

    def host_buffer_bytes(self) -> int:
        return self._stager.host_bytes() if self._stager else 0

    def wait_staged(self, device_side: bool = False) -> None:
        """Make sure the last save's device-to-host copies finished before its sources change.

        ``device_side=True`` makes the *current CUDA stream* wait (no host blocking: use it right
        before work on that stream mutates parameters or optimizer state, e.g. the optimizer
        step); otherwise the host blocks until the copies are done. No-op when nothing is pending.
        """
        ev, self._copy_event = self._copy_event, None
        if ev is None:
            return
        if device_side:
            torch.cuda.current_stream().wait_event(ev)
        else:
            ev.synchronize()

    def prepare(self, state_dict: dict[str, Any]) -> bool:
        """Allocate (pin) the staging buffers for ``state_dict`` in the background thread.

        The next ``save()`` waits for it. Returns False (doing nothing) when not async or a save
        is in flight. A failure (e.g. out of pinnable memory) is logged; the next save retries.
        """
        if self._stager is None or self._pending is not None or self._forked():
            return False
        stager = self._stager
        device = _current_cuda_device()

        def job() -> None:
            t = time.perf_counter()
            try:
                if device is not None:  # this thread would otherwise use (and init) GPU 0
                    torch.cuda.set_device(device)
                n = stager.allocate(state_dict)
            except Exception as e:  # e.g. out of pinnable memory: the save will say so
                logger.warning("allocating checkpoint staging buffers failed: %r", e)
                return
            logger.info(
                "checkpoint staging buffers ready: %.2f GB new%s in %.2fs",
                n / 1e9,
                " pinned" if stager.pinned else "",
                time.perf_counter() - t,
            )

        if self._worker is None:
            self._worker = _Worker("kempnerforge-ckpt")
        self._pending_desc = "staging buffer allocation"
        self._pending = self._worker.submit(job)
        return True

    def dcp_group(self, process_group: Any | None) -> Any | None:
        """The group DCP uses: in async modes a dedicated gloo twin of ``process_group``, made once."""
        if not self.is_async:
            return process_group
        key = id(process_group) if process_group is not None else None
        if key not in self._groups:
            self._groups[key] = gloo_group_like(process_group)
        return self._groups[key]

    def join(self, timeout: float | None = None) -> bool:
        """Block until the in-flight save ended (True) without raising; ``wait()`` reports it."""
        fut = self._pending
        if fut is None or self._forked():
            return True
        try:
            fut.exception(timeout=timeout)
        except FutureTimeoutError:
            return False
        return True

    def wait(self) -> None:
        """Block until the in-flight save finished; raise :class:`CheckpointError` if it failed.

        In a forked child the parent's save is not this process's to wait for: returns at once.
        """
        fut = self._pending
        if fut is None or self._forked():
            self._pending = None
            return
        try:
            fut.result()
        except BaseException as e:
            if not fut.done():
                # the wait itself was interrupted (a signal handler raised in this thread, e.g.
                # a DataLoader's for a dead worker): the save goes on and stays in flight
                raise
            self._pending = None
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(
                f"background checkpoint save of {self._pending_desc} failed: {e!r}"
            ) from e
        self._pending = None
        self._copy_event = None  # the job waited on it before writing

    def save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        process_group: Any | None = None,
        *,
        on_written: Callable[[Any], None] | None = None,
        on_failed: Callable[[BaseException], None] | None = None,
        step: int = -1,
        t0: float | None = None,
        digests: dict[str, tuple[int, str]] | None = None,
        defer_copy: bool = False,
        from_rank0: frozenset[str] = frozenset(),
    ) -> None:
        """Save ``state_dict`` to ``checkpoint_id`` (see the class docstring).

        ``digests``: filled with (size, xxh3_64) of every file DCP writes, by name, as it writes
        them. ``defer_copy`` (pinned CUDA staging only): return before the device-to-host copies
        finished; the caller promises to call ``wait_staged`` before mutating the state.
        ``from_rank0``: flattened keys of replicated tensors written from rank 0's copy
        (:class:`Rank0ReplicasPlanner`).
        """
        t0 = time.perf_counter() if t0 is None else t0
        if self._forked() and self.is_async:
            raise CheckpointError(
                f"this checkpointer belongs to process {self._pid}; a process forked from it "
                "(e.g. a DataLoader worker) cannot save through it"
            )
        self.wait()
        group = self.dcp_group(process_group)
        stats = SaveStats(
            step=step, mode=self.mode.value, pinned=self.pinned, path=str(checkpoint_id)
        )
        self.last_stats = stats

        if not self.is_async:
            stats.bytes = _tensor_bytes(state_dict)
            self._run(state_dict, checkpoint_id, group, on_written, on_failed, digests, from_rank0)
            stats.blocked_s = time.perf_counter() - t0
            if not stats.durable_s:
                stats.durable_s = stats.blocked_s
            return

        assert self._stager is not None
        ts = time.perf_counter()
        staged, nbytes, new_bytes = self._stager.stage(state_dict, sync=not defer_copy)
        event = self._copy_event = self._stager.last_event
        stats.staging_s = time.perf_counter() - ts
        if event is None:
            stats.staged_s = time.perf_counter() - t0
        stats.bytes, stats.new_host_bytes = nbytes, new_bytes

        device = _current_cuda_device() if event is not None else None

        def job() -> None:
            if event is not None:
                torch.cuda.set_device(device)  # this thread would otherwise use (and init) GPU 0
                event.synchronize()  # the host buffers are complete
                stats.staged_s = time.perf_counter() - t0
            self._run(staged, checkpoint_id, group, on_written, on_failed, digests, from_rank0)
            if not stats.durable_s:
                stats.durable_s = time.perf_counter() - t0

        if self._worker is None:
            self._worker = _Worker("kempnerforge-ckpt")
        self._pending_desc = str(checkpoint_id)
        stats.blocked_s = time.perf_counter() - t0  # before submit: the worker may log it
        self._pending = self._worker.submit(job)

    def _planner(self, group: Any, from_rank0: frozenset[str] = frozenset()) -> Any:
        """DCP's default save planner, caching its plans between saves where this torch can.

        Every save of a job has the same plan, and building the global one on rank 0 (a
        dataclass copy per tensor) runs in the background thread, competing with the training
        loop for the interpreter lock. DCP keys its cache by name, process-wide: each
        checkpointer and group gets its own key. A changed state dict is detected by DCP (it
        compares the local plans) and re-planned.
        """
        try:
            planner = Rank0ReplicasPlanner(from_rank0, enable_plan_caching=True)
        except TypeError:  # pragma: no cover - torch without plan caching
            return Rank0ReplicasPlanner(from_rank0)
        planner._cached_plans_key = f"kempnerforge-{self._uid}-{id(group)}"
        return planner

    def _run(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        group: Any,
        on_written: Callable[[Any], None] | None,
        on_failed: Callable[[BaseException], None] | None,
        digests: dict[str, tuple[int, str]] | None = None,
        from_rank0: frozenset[str] = frozenset(),
    ) -> None:
        try:
            writer = make_writer(
                checkpoint_id,
                thread_count=self.writer_threads,
                digests=digests,
                kind=self.writer_kind,
            )
            if digests is not None and hasattr(writer, "fs"):
                fs = hashing_filesystem(digests)  # None: this torch has no hook; manifest re-reads
                if fs is not None:
                    writer.fs = fs
            no_dist = not (dist.is_available() and dist.is_initialized())
            dcp.save(
                state_dict,
                storage_writer=writer,
                planner=self._planner(group, from_rank0),
                process_group=group,
                no_dist=no_dist,
            )
            if on_written is not None:
                on_written(group)
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            if on_failed is not None:
                try:
                    on_failed(e)
                except Exception:
                    logger.exception("cleanup after a failed save of %s failed", checkpoint_id)
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(
                f"checkpoint save to {checkpoint_id} failed: {describe_failure(e)}; "
                f"{diagnose_write_failure(checkpoint_id, _tensor_bytes(state_dict))}"
            ) from e

    def _forget_plans(self) -> None:
        """Drop this checkpointer's entries from DCP's process-wide plan caches."""
        from torch.distributed.checkpoint.planner import SavePlanner

        prefix = f"kempnerforge-{self._uid}-"
        for name, cache in vars(SavePlanner).items():
            if name.startswith("_cached") and isinstance(cache, dict):
                for k in [k for k in cache if isinstance(k, str) and k.startswith(prefix)]:
                    del cache[k]

    def close(self) -> None:
        """Drain (raising a failure), stop the worker thread and wait for it to end.

        In a forked child: only drops this copy's references (the threads are the parent's).
        """
        if self._forked():
            self._pending, self._copy_event, self._worker = None, None, None
            if self._stager is not None:
                self._stager._pool = None  # its threads did not come along
            return
        fut = self._pending
        try:
            self.wait()
        finally:
            self._copy_event = None  # the job synchronized on it
            if self._worker is not None:
                # joined unless a save is still running (the wait above was interrupted)
                idle = fut is None or fut.done()
                self._worker.stop(timeout=None if idle else 0)
                self._worker = None
            if self._stager is not None:
                self._stager.close()
            self._forget_plans()


def _current_cuda_device() -> int | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return None


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    if DTensor is not None and isinstance(obj, DTensor):
        t = obj._local_tensor
        return t.numel() * t.element_size()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return 0
