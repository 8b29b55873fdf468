"""How checkpoint bytes leave the device: synchronous, async, or async through pinned buffers.

``disabled``: ``dcp.save`` runs in the caller on the live tensors.

``async`` / ``async_with_pinned_mem``: the caller only *stages*: every tensor (the local shard of a
DTensor) is copied into a host buffer that is allocated once and reused by every later save (first
touch of fresh memory costs ~2.4 s/GiB; a copy into an existing buffer runs at memcpy speed). On
CUDA with ``async_with_pinned_mem`` those buffers are pinned and the copies are issued
``non_blocking`` on a side stream with a single synchronize at the end. A single background thread
then runs ``dcp.save`` on a dedicated gloo process group (thread-mode saves on the default group
deadlock while training runs collectives) followed by the caller's ``on_written`` step (train
state, manifest, commit). Each save first drains the previous one and re-raises its failure.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from kempnerforge.checkpoint.config import AsyncCheckpointMode
from kempnerforge.checkpoint.guards import describe_failure, diagnose_write_failure

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
    ``staging_s``: part of it spent copying into host buffers; ``durable_s``: ``save()`` call to
    ``latest`` committed; ``gbps``: ``total_bytes`` (or ``bytes``) / ``durable_s`` / 1e9;
    ``new_host_bytes``: host memory newly allocated for staging (0 once buffers are reused).
    """

    step: int = -1
    mode: str = "disabled"
    bytes: int = 0
    total_bytes: int = 0
    blocked_s: float = 0.0
    staging_s: float = 0.0
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
class HostStager:
    """Copies a (nested) state dict into host buffers kept between saves.

    Buffers are keyed by the value's path in the state dict and (shape, dtype); a key whose shape
    or dtype changes gets a new buffer (counted in ``new_host_bytes``). DTensors keep their
    sharding spec and get the host buffer as local tensor, so DCP plans the same shards it would
    plan for the live state. Non-tensor leaves (param-group hyperparameters, ints) are copied.
    """

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._stream: Any = None

    def host_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def stage(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        """Returns (staged state dict, tensor bytes staged, bytes newly allocated)."""
        counters = [0, 0]
        side = None
        if self.pinned and torch.cuda.is_available():
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            side = self._stream
            side.wait_stream(torch.cuda.current_stream())  # copies see finished optimizer math
        staged = self._walk(state_dict, (), counters, side)
        if side is not None:
            side.synchronize()  # the one sync: buffers are complete, sources may change again
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return staged, counters[0], counters[1]

    def _walk(self, obj: Any, path: tuple, counters: list[int], side: Any) -> Any:
        if isinstance(obj, dict):
            return {k: self._walk(v, (*path, k), counters, side) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._walk(v, (*path, i), counters, side) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(self._walk(v, (*path, i), counters, side) for i, v in enumerate(obj))
        if DTensor is not None and isinstance(obj, DTensor):
            local = self._copy(obj._local_tensor, path, counters, side)
            return _wrap_like(obj, local)
        if isinstance(obj, torch.Tensor):
            return self._copy(obj, path, counters, side)
        return copy.deepcopy(obj)

    def _copy(self, src: torch.Tensor, path: tuple, counters: list[int], side: Any) -> torch.Tensor:
        src = src.detach()
        buf = self._buffers.get(path)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            pin = side is not None
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buf
            counters[1] += buf.numel() * buf.element_size()
        if side is not None and src.is_cuda:
            with torch.cuda.stream(side):
                buf.copy_(src, non_blocking=True)
        else:
            buf.copy_(src)
        counters[0] += buf.numel() * buf.element_size()
        return buf


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
    """

    def __init__(self, name: str) -> None:
        self._q: queue.Queue = queue.Queue()
        self._t = threading.Thread(target=self._run, name=name, daemon=True)
        self._t.start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()
        self._q.put((fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            fn, fut = self._q.get()
            if fn is None:
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # DCP's CheckpointException is a BaseException
                fut.set_exception(e)

    def stop(self) -> None:
        self._q.put((None, None))


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
class AsyncCheckpointer:
    """Non-blocking checkpoint saver; each new save waits for the previous one first.

    ``save(state_dict, checkpoint_id, process_group)`` writes a DCP checkpoint to
    ``checkpoint_id``. ``on_written`` (keyword, optional) runs after DCP finished, in the same
    thread (the background one in async modes), with ``dcp_group``, the group DCP used; the
    manager uses it to write its train state and commit. Failures of a background save surface
    as :class:`CheckpointError` at the next ``save()`` or ``wait()``.
    """

    def __init__(
        self, mode: AsyncCheckpointMode = AsyncCheckpointMode.disabled, *, writer_threads: int = 4
    ) -> None:
        self.mode = AsyncCheckpointMode(mode)
        self.writer_threads = writer_threads
        self.pinned = self.mode is AsyncCheckpointMode.async_pinned and torch.cuda.is_available()
        if self.mode is AsyncCheckpointMode.async_pinned and not self.pinned:
            logger.info(
                "async_with_pinned_mem without CUDA: staging into plain reused host buffers (as 'async')"
            )
        self._stager = HostStager(pinned=self.pinned) if self.is_async else None
        self._worker: _Worker | None = None
        self._pending: Future | None = None
        self._pending_desc = ""
        self._groups: dict[Any, Any] = {}
        self.last_stats = SaveStats()

    @property
    def is_async(self) -> bool:
        return self.mode is not AsyncCheckpointMode.disabled

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def host_buffer_bytes(self) -> int:
        return self._stager.host_bytes() if self._stager else 0

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
        if fut is None:
            return True
        try:
            fut.exception(timeout=timeout)
        except FutureTimeoutError:
            return False
        return True

    def wait(self) -> None:
        """Block until the in-flight save finished; raise :class:`CheckpointError` if it failed."""
        fut, self._pending = self._pending, None
        if fut is None:
            return
        try:
            fut.result()
        except CheckpointError:
            raise
        except BaseException as e:
            raise CheckpointError(
                f"background checkpoint save of {self._pending_desc} failed: {e!r}"
            ) from e

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
    ) -> None:
        t0 = time.perf_counter() if t0 is None else t0
        self.wait()
        group = self.dcp_group(process_group)
        stats = SaveStats(
            step=step, mode=self.mode.value, pinned=self.pinned, path=str(checkpoint_id)
        )
        self.last_stats = stats

        if not self.is_async:
            stats.bytes = _tensor_bytes(state_dict)
            self._run(state_dict, checkpoint_id, group, on_written, on_failed)
            stats.blocked_s = time.perf_counter() - t0
            if not stats.durable_s:
                stats.durable_s = stats.blocked_s
            return

        assert self._stager is not None
        ts = time.perf_counter()
        staged, nbytes, new_bytes = self._stager.stage(state_dict)
        stats.staging_s = time.perf_counter() - ts
        stats.bytes, stats.new_host_bytes = nbytes, new_bytes

        def job() -> None:
            self._run(staged, checkpoint_id, group, on_written, on_failed)
            if not stats.durable_s:
                stats.durable_s = time.perf_counter() - t0

        if self._worker is None:
            self._worker = _Worker("kempnerforge-ckpt")
        self._pending_desc = str(checkpoint_id)
        stats.blocked_s = time.perf_counter() - t0  # before submit: the worker may log it
        self._pending = self._worker.submit(job)

    def _run(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        group: Any,
        on_written: Callable[[Any], None] | None,
        on_failed: Callable[[BaseException], None] | None,
    ) -> None:
        try:
            writer = FileSystemWriter(
                checkpoint_id, thread_count=self.writer_threads, sync_files=True
            )
            no_dist = not (dist.is_available() and dist.is_initialized())
            dcp.save(state_dict, storage_writer=writer, process_group=group, no_dist=no_dist)
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

    def close(self) -> None:
        """Drain (raising a failure) and stop the worker thread."""
        try:
            self.wait()
        finally:
            if self._worker is not None:
                self._worker.stop()
                self._worker = None


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
