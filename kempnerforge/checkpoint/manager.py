"""Checkpoint policy: where a step lives, how it is committed, what resume loads, what is pruned.

Layout (see docs/checkpointing.md)::

    {dir}/latest -> step_N            relative symlink, swapped atomically after a commit
    {dir}/step_N/.metadata            DCP metadata (pipeline parallel: step_N/pp_K/.metadata)
    {dir}/step_N/__R_I.distcp         DCP shards
    {dir}/step_N/train_state/rank_00000.pt   per-rank train state (weights_only-loadable)
    {dir}/step_N/metadata.json        written last: step, tokens_seen, world_size, manifest, ...
    {dir}/.tmp_step_N-XXXXXXXX/       a save in progress (never loaded)
    {dir}/.trash/                     pruned or replaced steps awaiting background deletion

Commit protocol: every rank writes into the temp dir (DCP shards fsynced by DCP and checksummed
as they are written, train state by temp+fsync+rename), and sends its manifest to rank 0. Rank 0
writes ``metadata.json`` (temp+fsync+rename), renames the temp dir to ``step_N`` (swapping atomically
with an existing ``step_N``), fsyncs ``{dir}``, swaps ``latest``, fsyncs ``{dir}`` again, then
broadcasts the outcome: no rank returns before ``latest`` is durable. A directory named
``step_N`` is therefore always complete.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kempnerforge.checkpoint import storage
from kempnerforge.checkpoint.async_save import (
    AsyncCheckpointer,
    CheckpointError,
    SaveStats,
    _Worker,
)
from kempnerforge.checkpoint.config import CheckpointConfig
from kempnerforge.checkpoint.guards import (
    check_compatible,
    check_dir_safety,
    diagnose_write_failure,
    explain_dcp_failure,
)
from kempnerforge.checkpoint.lock import JobLock, acquire_job_lock
from kempnerforge.checkpoint.reader import CheckpointReader
from kempnerforge.checkpoint.safe_unpickle import SafeLoadPlanner
from kempnerforge.checkpoint.state import (
    build_train_state,
    deserialize_train_state,
    reseed_rng,
    restore_train_state,
    serialize_train_state,
)
from kempnerforge.freeze import all_trainable

logger = logging.getLogger(__name__)

LOADABLE_KEYS = ("model", "optimizer")


@dataclass
class Resolution:
    """What a resume would load: ``path`` (a step dir) and its metadata, or why nothing/error."""

    path: str | None = None
    meta: dict[str, Any] | None = None
    error: str | None = None
    source: str = "none"  # "own" (this manager's dir) | "load_path" | "explicit" | "none"
    warnings: list[str] = field(default_factory=list)


def find_resumable(root: str | os.PathLike, verify: str = "size") -> Resolution:
    """Newest complete checkpoint under a checkpoint root, trying ``latest`` first.

    When ``latest`` is missing, dangling, points outside ``root``, or at a step that fails
    verification, fall back to the most recently committed ``step_<int>`` dir that passes (by
    commit time in metadata.json, then step), with a warning naming why. Never raises.
    """
    root = Path(root)
    res = Resolution()
    tried: set[str] = set()
    target, why = storage.read_latest(root)
    steps = storage.list_step_dirs(root)
    if target is not None:
        tried.add(target.name)
        meta, prob = storage.read_metadata(target)
        problems = [prob] if prob else storage.verify_step_dir(target, verify, meta)
        if not problems:
            res.path, res.meta = str(target), meta
            return res
        res.warnings.append(f"{root}/latest -> {target.name} is not usable ({problems[0]})")
    elif steps and why:
        res.warnings.append(why)
    ordered = []
    for step, p in steps:
        if p.name in tried:
            continue
        meta, prob = storage.read_metadata(p)
        if prob is not None:
            res.warnings.append(f"skipping {p} ({prob})")
            continue
        ordered.append((storage.commit_time_ns(p, meta), step, p, meta))
    for _t, _s, p, meta in sorted(ordered, key=lambda x: (x[0], x[1]), reverse=True):
        problems = storage.verify_step_dir(p, verify, meta)
        if problems:
            res.warnings.append(f"skipping {p} ({problems[0]})")
            continue
        res.path, res.meta = str(p), meta
        if res.warnings:
            res.warnings.append(f"falling back to {p}")
        return res
    return res


def resolve_explicit(path: str | os.PathLike, verify: str = "size") -> Resolution:
    """A step dir (or a checkpoint root, or a ``latest`` link) the user named. Errors name it."""
    p = Path(path)
    if not p.exists():
        return Resolution(
            error=f"checkpoint path {p} does not exist (check checkpoint.load_path or the path passed to load)"
        )
    if not p.is_dir():
        return Resolution(error=f"checkpoint path {p} is not a directory")
    is_step = (
        (p / storage.METADATA_FILE).exists()
        or (p / storage.DCP_METADATA_FILE).exists()
        or storage.parse_step_dir(p.resolve().name) is not None
    )
    if is_step:
        p = p.resolve()
        meta, prob = storage.read_metadata(p)
        problems = [prob] if prob else storage.verify_step_dir(p, verify, meta)
        if problems:
            return Resolution(error=f"checkpoint {p} is not usable: {problems[0]}")
        return Resolution(path=str(p), meta=meta)
    res = find_resumable(p, verify)
    if res.path is None:
        res.error = f"no complete checkpoint found under {p}" + (
            f" ({'; '.join(res.warnings)})" if res.warnings else ""
        )
    return res


class CheckpointManager:
    """Manages save/load/cleanup of distributed checkpoints.

    Each checkpoint lives in ``{dir}/step_{N}/`` (DCP shards + train state + metadata.json);
    ``{dir}/latest`` is a relative symlink to the most recently committed one. Works with a plain
    ``nn.Module`` in one process, and with FSDP2 / DDP under torchrun (checkpoints reshard).
    """

    def __init__(
        self,
        config: CheckpointConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        process_group: Any | None = None,
        pp_rank: int | None = None,
    ) -> None:
        if not config.dir:
            raise ValueError(
                "checkpoint.dir is empty: set it (JobConfig fills <output_dir>/checkpoints)"
            )
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.process_group = process_group
        self.pp_rank = pp_rank
        self.dir = Path(config.dir).absolute()
        self.trash = self.dir / storage.TRASH_DIR
        self._dist = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self._dist else 0
        self.world_size = dist.get_world_size() if self._dist else 1
        # Control group for object collectives (resolve broadcast, manifest gather, commit
        # outcome); gloo so it works from the background thread and with NCCL default groups.
        self._ctrl = dist.new_group(backend="gloo") if self._dist else None
        self._checkpointer = AsyncCheckpointer(
            config.async_mode,
            writer_threads=config.resolved_writer_threads(),
            writer_kind=config.writer,
        )
        # Pinned CUDA staging returns before the device-to-host copy finished; the optimizer step
        # (the only thing in a training step that changes saved state in place) first makes its
        # stream wait for that copy. Without an optimizer we cannot know: copy synchronously.
        self._hooks: list[Any] = []
        self._prepared = False
        self._defer_copy = self._checkpointer.pinned and optimizer is not None
        if self._defer_copy:
            assert optimizer is not None
            self._hooks.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
            if _mutates_in_forward(model):  # e.g. BatchNorm running stats live in the state
                self._hooks.append(model.register_forward_pre_hook(self._before_forward))
        if self._checkpointer.is_async and self._dist:
            if process_group is None:
                self._checkpointer._groups[None] = self._ctrl  # DCP shares the dedicated group
            else:
                self._checkpointer.dcp_group(process_group)  # collective: create it now, once
        self._janitor: _Worker | None = None
        self._pending_dataloader_state: Any = None
        self._peeked: tuple[Any, Resolution] | None = None
        self._inflight_step: int | None = None
        self._lock: JobLock | None = None  # taken by rank 0 at the first save, never for loads
        if self.rank == 0:
            storage.make_dir(self.dir, config.dir_mode)

    # ------------------------------------------------------------------ collectives helpers
    def _bcast(self, obj: Any) -> Any:
        if not self._dist:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._ctrl)
        return box[0]

    def _gather(self, obj: Any) -> list[Any] | None:
        if not self._dist:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self._ctrl)
        return out

    # ------------------------------------------------------------------ properties
    @property
    def last_save_stats(self) -> SaveStats:
        """Figures of the most recent save on this rank (final once ``wait()`` returned)."""
        return self._checkpointer.last_stats

    @property
    def checkpointer(self) -> AsyncCheckpointer:
        return self._checkpointer

    # ------------------------------------------------------------------ staging hooks
    def _before_optimizer_step(self, *_: Any) -> None:
        self._checkpointer.wait_staged(device_side=True)

    def _before_forward(self, *_: Any) -> None:
        self._checkpointer.wait_staged(device_side=True)

    def _after_optimizer_step(self, optimizer: Any, *_: Any) -> None:
        # After the first step the optimizer state exists: pin the staging buffers now, in the
        # background, instead of inside the first save (~0.6 s per GiB).
        if not self._prepared and optimizer.state:
            self.prepare()

    def prepare(self) -> bool:
        """Allocate (pin) the host staging buffers now, in the background thread.

        Async modes only; call it once the optimizer state exists (after the first step) so the
        first ``save()`` does not pay for the allocation. With ``async_with_pinned_mem`` on CUDA
        the manager does this by itself after the first optimizer step. The next ``save()`` waits
        for it if it is still running. Returns False when there is nothing to do.
        """
        if not self._checkpointer.is_async or self._prepared:
            return False
        self._prepared = True
        return self._checkpointer.prepare(self._state_dict())

    # ------------------------------------------------------------------ save
    def _state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        # One call for both: torch maps parameter names once instead of twice (half of the
        # time ``save()`` spends assembling the state dict). Frozen parameters are in the
        # model part either way; the optimizer part needs them marked trainable.
        with all_trainable(self.model):
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def save(
        self,
        step: int,
        tokens_seen: int = 0,
        scheduler: Any | None = None,
        dataloader: Any | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Save a checkpoint at ``step``.

        Sync mode: returns once ``latest`` points at the durable ``step_{step}``. Async modes:
        returns once the state is staged in host memory; the write and commit finish in the
        background (``wait()`` to be sure). A failure of the previous async save is raised here.
        """
        t0 = time.perf_counter()
        self._checkpointer.wait()
        self._peeked = None
        state = build_train_state(step, tokens_seen, scheduler, dataloader, extra)
        ts_bytes = serialize_train_state(state)  # RNG of step N, captured now
        token = self._bcast(self._prepare_save() if self.rank == 0 else None)
        if isinstance(token, BaseException):
            raise token  # every rank: directory unsafe or locked by another job
        tmp = self.dir / f"{storage.TMP_PREFIX}{int(step)}-{token}"
        dcp_dir = tmp / f"pp_{self.pp_rank}" if self.pp_rank is not None else tmp
        storage.make_dir(tmp / storage.TRAIN_STATE_DIR, self.config.dir_mode)
        storage.make_dir(dcp_dir, self.config.dir_mode)
        meta = {
            "format": storage.FORMAT_NAME,
            "format_version": storage.FORMAT_VERSION,
            "step": int(step),
            "tokens_seen": int(tokens_seen),
            "world_size": self.world_size,
            "async_mode": self.config.async_mode.value,
            "torch_version": torch.__version__,
        }
        if self.pp_rank is not None:
            meta["pipeline_parallel"] = True
        if extra and "vlm_freeze" in extra:
            meta["vlm_freeze"] = extra["vlm_freeze"]
        job = _CommitJob(self, int(step), tmp, dcp_dir, ts_bytes, meta, t0)
        self._inflight_step = int(step)
        self._prepared = True  # buffers are allocated by this save if not before
        self._checkpointer.save(
            self._state_dict(),
            str(dcp_dir),
            self.process_group,
            on_written=job.finish,
            on_failed=job.failed,
            step=int(step),
            t0=t0,
            digests=job.digests,
            defer_copy=self._defer_copy,
        )

    def _prepare_save(self) -> str | BaseException:
        """Rank 0, every save: the directory is ours to write and this job holds its lock.

        Returns the save's temp-dir token, or the exception every rank must raise (sent with
        the token broadcast the save needs anyway, so the check costs no extra collective).
        """
        try:
            check_dir_safety(self.dir, for_write=True, dir_mode=self.config.dir_mode)
            if self._lock is None:
                self._lock = acquire_job_lock(self.dir, dir_mode=self.config.dir_mode)
                weakref.finalize(self, self._lock.release)  # a manager dropped without close()
                if self.trash.is_dir() and any(self.trash.iterdir()):
                    self._schedule_trash()  # left by an earlier run that did not wait for it
        except Exception as e:
            return e
        return uuid.uuid4().hex[:8]

    def wait(self) -> None:
        """Block until the in-flight async save is durable and its ``latest`` committed.

        Returns at once when nothing is in flight; raises :class:`CheckpointError` if it failed.
        """
        self._checkpointer.wait()

    def flush_pending_save(self) -> None:
        """Drain the in-flight save (and commit its ``latest``) before model state changes.

        The freeze-transition hook calls this so a save started before a transition records the
        pre-transition spec with the pre-transition shards.
        """
        self._checkpointer.wait()

    def close(self, wait_for_trash: bool = True) -> None:
        """Drain the save, stop background threads, finish deleting pruned checkpoints.

        ``wait_for_trash=False`` (a preempted job on its way out): do not wait for the deletion
        of pruned steps; what is left in ``.trash`` is deleted by the next run's first save.
        Calling ``close`` again is harmless.
        """
        try:
            self._checkpointer.close()
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self._defer_copy = False
            if self._janitor is not None:
                # joined (after the queued deletions) so it is not running at interpreter exit
                self._janitor.stop(timeout=None if wait_for_trash else 0)
                self._janitor = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _schedule_trash(self) -> None:
        if self._janitor is None:
            self._janitor = _Worker("kempnerforge-ckpt-trash")
        trash = self.trash
        self._janitor.submit(lambda: storage.empty_trash(trash))

    def _retain(self, committed: Path) -> None:
        """Keep the ``keep_last_n`` most recently *committed* steps (rank 0, after a commit).

        Never touches ``latest``'s target, the step just committed or in flight, or directories
        that are not ``step_<int>``. Pruned dirs are renamed into ``.trash`` (instant) and deleted
        by a background thread. Temp dirs of saves older than twice ``save_timeout_s`` (dead by
        the watchdog's definition) are cleaned too.
        """
        storage.test_pause("retention", self.rank)
        now = time.time()
        for child in self.dir.iterdir():
            if child.name.startswith(storage.TMP_PREFIX) and child.is_dir():
                try:
                    if now - child.stat().st_mtime > 2 * self.config.save_timeout_s:
                        storage.move_to_trash(child, self.trash)
                except OSError:
                    pass
        n = self.config.keep_last_n
        if n > 0:
            latest, _ = storage.read_latest(self.dir)
            protected = {committed.name}
            if latest is not None:
                protected.add(latest.name)
            if self._inflight_step is not None:
                protected.add(storage.step_dir_name(self._inflight_step))
            ranked = []
            for step, p in storage.list_step_dirs(self.dir):
                meta, _ = storage.read_metadata(p)
                if meta is None:
                    continue  # not provably ours/complete: leave it alone
                ranked.append((storage.commit_time_ns(p, meta), step, p))
            ranked.sort(key=lambda x: (x[0], x[1]))
            for _t, _s, p in ranked[: max(0, len(ranked) - n)]:
                if p.name in protected:
                    continue
                storage.move_to_trash(p, self.trash)
                logger.info("retention: pruned %s (keep_last_n=%d, by commit order)", p, n)
            storage.fsync_dir(self.dir)
        if self.trash.exists():
            self._schedule_trash()

    # ------------------------------------------------------------------ load
    def _resolve(self, path: str | None) -> Resolution:
        """Rank 0's view of what to load: explicit path > own dir's checkpoint > load_path."""
        verify = self.config.verify_on_load
        if path is not None:
            res = resolve_explicit(path, verify)
            res.source = "explicit"
        else:
            res = find_resumable(self.dir, verify) if self.dir.is_dir() else Resolution()
            res.source = "own"
            if res.path is None and self.config.load_path:
                warnings = res.warnings
                res = resolve_explicit(self.config.load_path, verify)
                res.source = "load_path"
                res.warnings = warnings + res.warnings
            elif res.path is None:
                res.source = "none"
        if res.path is not None and Path(res.path).resolve().parent == self.dir.resolve():
            res.source = "own"
        return res

    def _resolve_agreed(self, path: str | None, use_peeked: bool = False) -> Resolution:
        """Rank 0 resolves, every rank gets the same answer (no stale per-rank FS views).

        ``load`` passes ``use_peeked``: it then loads exactly what the preceding
        ``peek_saved_step`` (same path argument, no save in between) reported.
        """
        key = (None if path is None else str(path),)
        if use_peeked and self._peeked is not None and self._peeked[0] == key:
            res = self._peeked[1]
        else:
            self._checkpointer.join()  # the group must be idle; a failure stays for save()/wait()
            res = None
            if self.rank == 0:
                try:
                    res = self._resolve(path)
                except Exception as e:  # a filesystem error must not leave other ranks hanging
                    res = Resolution(error=f"resolving the checkpoint to load failed: {e!r}")
                for w in res.warnings:
                    logger.warning("checkpoint resume: %s", w)
            res = self._bcast(res)
        self._peeked = (key, res)
        return res

    def peek_saved_step(self, path: str | None = None) -> int | None:
        """Step of the checkpoint ``load(path)`` would load, or None. Never raises for a missing
        or unreadable checkpoint; ``load`` then uses the very same directory."""
        try:
            res = self._resolve_agreed(path)
        except CheckpointError:
            raise
        except Exception as e:
            logger.warning("peek_saved_step: %r", e)
            return None
        if res.path is None or res.meta is None:
            return None
        return int(res.meta["step"])

    def load(
        self,
        path: str | None = None,
        scheduler: Any | None = None,
        dataloader: Any | None = None,
        exclude_keys: list[str] | None = None,
        vlm_freeze_expected: list[dict[str, Any]] | None = None,
    ) -> tuple[int, int, dict[str, Any]]:
        """Load a checkpoint and restore all state; returns (step, tokens_seen, extra).

        ``path=None``: this manager's newest complete checkpoint (``latest`` first), else
        ``config.load_path``; ``(0, 0, {})`` when neither exists. An explicit path that does not
        exist or is incomplete raises ``FileNotFoundError`` naming it. ``config.exclude_from_loading``
        applies to checkpoints from elsewhere (``load_path`` / an explicit path outside ``dir``),
        never to this run's own resume, which must be exact.
        """
        res = self._resolve_agreed(path, use_peeked=True)
        self._peeked = None
        if res.error is not None:
            raise FileNotFoundError(res.error)
        if res.path is None or res.meta is None:
            logger.info("no checkpoint to resume from under %s: starting fresh", self.dir)
            return 0, 0, {}
        step_dir, meta = Path(res.path), res.meta

        self._check_freeze(step_dir, meta, vlm_freeze_expected)
        excluded = set(exclude_keys or [])
        if res.source != "own":
            excluded |= set(self.config.exclude_from_loading)
        unknown = excluded - set(LOADABLE_KEYS)
        if unknown:
            raise ValueError(
                f"exclude_keys {sorted(unknown)} unknown; use any of {list(LOADABLE_KEYS)}"
            )

        dcp_dir = step_dir / f"pp_{self.pp_rank}" if self.pp_rank is not None else step_dir
        sd: dict[str, Any] = {}
        if "model" not in excluded:
            sd["model"] = get_model_state_dict(self.model)
        if "optimizer" not in excluded and self.optimizer is not None:
            with all_trainable(self.model):
                sd["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        # Before any state moves: read DCP's metadata through the restricted unpickler and
        # compare keys/shapes (rank 0; the verdict is broadcast so every rank raises together),
        # and make sure the train state is there.
        ts_name = storage.train_state_name(
            self.rank if int(meta.get("world_size", self.world_size)) == self.world_size else 0
        )
        problem: BaseException | None = None
        if self.rank == 0:
            try:
                check_dir_safety(step_dir.parent, for_write=False)
                if sd:
                    check_compatible(dcp_dir, sd)
            except Exception as e:
                problem = e
        problem = self._bcast(problem)
        if problem is not None:
            raise problem
        if not (step_dir / ts_name).is_file():
            raise FileNotFoundError(
                f"train state {step_dir / ts_name} is missing: checkpoint {step_dir} is "
                "incomplete; load another step or delete it"
            )
        if sd:
            self._checkpointer.wait_staged()  # a save's copy must not read half-loaded tensors
            try:
                dcp.load(
                    sd,
                    checkpoint_id=str(dcp_dir),
                    storage_reader=CheckpointReader(str(dcp_dir)),
                    planner=SafeLoadPlanner(),
                    process_group=self.process_group,
                    no_dist=not self._dist,
                )
            except CheckpointException as e:  # a BaseException: name the real cause
                raise explain_dcp_failure(e, dcp_dir) from e
            if "model" in sd:
                set_model_state_dict(self.model, sd["model"])
            if "optimizer" in sd:
                with all_trainable(self.model):
                    set_optimizer_state_dict(self.model, self.optimizer, sd["optimizer"])

        saved_ws = int(meta.get("world_size", self.world_size))
        same_world = saved_ws == self.world_size
        ts_file = step_dir / storage.train_state_name(self.rank if same_world else 0)
        try:
            data = ts_file.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"train state {ts_file} is missing: checkpoint {step_dir} is incomplete; "
                f"load another step or delete it"
            ) from None
        state = deserialize_train_state(data, str(ts_file))
        if not same_world:
            rng = state.pop("rng", None)
            seed = reseed_rng(rng, self.rank)
            logger.warning(
                "checkpoint %s was saved with %d ranks, loading with %d: rank %d RNG re-seeded "
                "deterministically (seed %d) instead of restored",
                step_dir,
                saved_ws,
                self.world_size,
                self.rank,
                seed,
            )
        loader_ok = dataloader is not None and hasattr(dataloader, "load_state_dict")
        step, tokens, extra = restore_train_state(
            state, scheduler, dataloader if loader_ok else None
        )
        self._pending_dataloader_state = state.get("dataloader") if dataloader is None else None
        logger.info(
            "resumed from %s (step %d, tokens %d%s)",
            step_dir,
            step,
            tokens,
            f", excluded {sorted(excluded)}" if excluded else "",
        )
        return step, tokens, extra

    def _check_freeze(
        self, step_dir: Path, meta: dict[str, Any], expected: list[dict[str, Any]] | None
    ) -> None:
        saved = meta.get("vlm_freeze")
        if saved is None or expected is None:
            return
        s = {e["module"]: bool(e["frozen"]) for e in saved}
        x = {e["module"]: bool(e["frozen"]) for e in expected}
        diff = [
            f"{m}: saved frozen={s[m]}, expected frozen={x[m]}"
            for m in sorted(s.keys() & x.keys())
            if s[m] != x[m]
        ]
        if not diff:
            return
        msg = (
            f"freeze mismatch between {step_dir}/{storage.METADATA_FILE} and this run's freeze "
            f"schedule ({'; '.join(diff)}); set checkpoint.ignore_freeze_mismatch=true to load anyway"
        )
        if self.config.ignore_freeze_mismatch:
            logger.warning("%s (ignored)", msg)
            return
        raise ValueError(msg)

    def apply_dataloader_state(self, dataloader: Any) -> None:
        """Apply dataloader state stashed by a ``load()`` that had no loader; clear the stash."""
        state, self._pending_dataloader_state = self._pending_dataloader_state, None
        if state is not None and hasattr(dataloader, "load_state_dict"):
            dataloader.load_state_dict(state)


class _CommitJob:
    """The part of one save that runs after DCP wrote its shards (background thread if async)."""

    def __init__(
        self,
        mgr: CheckpointManager,
        step: int,
        tmp: Path,
        dcp_dir: Path,
        ts_bytes: bytes,
        meta: dict[str, Any],
        t0: float,
    ) -> None:
        self.mgr, self.step, self.tmp, self.dcp_dir = mgr, step, tmp, dcp_dir
        self.ts_bytes, self.meta, self.t0 = ts_bytes, meta, t0
        # (size, xxh3_64) of each file DCP wrote, by name, hashed while it was written
        self.digests: dict[str, tuple[int, str]] = {}

    def _known(self) -> dict[str, tuple[int, str]]:
        sub = self.dcp_dir.relative_to(self.tmp)
        return {(sub / name).as_posix(): v for name, v in self.digests.items()}

    def _local(self, group: Any) -> tuple[str | None, dict[str, Any]]:
        """Write this rank's train state and checksum the files this rank wrote."""
        rank = self.mgr.rank
        try:
            storage.test_pause("dcp_written", rank)
            rel_ts = storage.train_state_name(rank)
            storage.atomic_write_bytes(
                self.tmp / rel_ts, self.ts_bytes, pause_point="train_state_write", rank=rank
            )
            grank = (
                dist.get_rank(group)
                if (self.mgr._dist and group is not None)
                else (dist.get_rank() if self.mgr._dist else 0)
            )
            prefix = f"__{grank}_"
            sub = self.dcp_dir.relative_to(self.tmp)
            own = [rel_ts] + [
                (sub / f.name).as_posix()
                for f in self.dcp_dir.iterdir()
                if f.name.startswith(prefix)
            ]
            return None, storage.manifest_entries(self.tmp, own, self._known())
        except Exception as e:
            return f"rank {rank}: {e!r}", {}

    def _commit(self, parts: list[Any]) -> tuple[bool, str, int]:
        """Rank 0: complete the manifest, write metadata.json, rename, swap ``latest``."""
        errors = [err for err, _ in parts if err]
        if errors:
            return False, "; ".join(errors), 0
        mgr = self.mgr
        if mgr._lock is not None:
            mgr._lock.check()  # another job took the directory over: do not commit into it
        files: dict[str, Any] = {}
        for _, entries in parts:
            files.update(entries)
        rest = [
            f for f in storage.list_files(self.tmp) if f not in files and f != storage.METADATA_FILE
        ]
        # .metadata (hashed while rank 0 wrote it) and anything unclaimed
        files.update(storage.manifest_entries(self.tmp, rest, self._known()))
        for d in {self.tmp, self.tmp / storage.TRAIN_STATE_DIR, self.dcp_dir}:
            storage.fsync_dir(d)
        now = time.time_ns()
        meta = dict(self.meta)
        meta["saved_at"] = _dt.datetime.fromtimestamp(now / 1e9, _dt.timezone.utc).isoformat()
        meta["saved_at_ns"] = now
        meta["manifest"] = {"algorithm": storage.CHECKSUM_ALGO, "files": files}
        storage.atomic_write_json(self.tmp / storage.METADATA_FILE, meta)
        storage.test_pause("pre_commit", mgr.rank)
        final = mgr.dir / storage.step_dir_name(self.step)
        storage.commit_dir(self.tmp, final, mgr.trash)
        storage.atomic_symlink(final.name, mgr.dir / storage.LATEST, rank=mgr.rank)
        return True, "", sum(int(e["size"]) for e in files.values())

    def finish(self, group: Any) -> None:
        mgr = self.mgr
        local = self._local(group)
        parts = mgr._gather(local)
        outcome: tuple[bool, str, int] = (False, "", 0)
        if mgr.rank == 0:
            assert parts is not None
            try:
                outcome = self._commit(parts)
            except Exception as e:
                outcome = (False, f"rank 0 commit: {e!r}", 0)
            if not outcome[0]:
                self._discard()
                outcome = (False, f"{outcome[1]}; {diagnose_write_failure(mgr.dir)}", 0)
        ok, msg, total = mgr._bcast(outcome)  # the barrier: nobody returns before `latest` moved
        if not ok:
            raise CheckpointError(
                f"checkpoint step {self.step} was not committed ({msg}); `latest` still points at "
                f"the previous checkpoint"
            )
        stats = mgr._checkpointer.last_stats
        stats.durable_s = time.perf_counter() - self.t0
        if not mgr._checkpointer.is_async:
            stats.blocked_s = stats.durable_s
        stats.total_bytes = total
        stats.gbps = (total or stats.bytes) / max(stats.durable_s, 1e-9) / 1e9
        stats.committed = True
        stats.path = str(mgr.dir / storage.step_dir_name(self.step))
        if mgr.rank == 0:
            logger.info(
                "checkpoint step=%d bytes=%d blocked=%.3fs durable=%.3fs rate=%.2fGB/s mode=%s "
                "new_host_bytes=%d path=%s",
                self.step,
                total,
                stats.blocked_s,
                stats.durable_s,
                stats.gbps,
                stats.mode,
                stats.new_host_bytes,
                stats.path,
            )
            try:
                mgr._retain(mgr.dir / storage.step_dir_name(self.step))
            except Exception as e:  # pruning must never fail a committed save
                logger.warning("retention after step %d failed: %r", self.step, e)
        mgr._inflight_step = None

    def failed(self, exc: BaseException) -> None:
        """DCP itself failed (every rank raises together): rank 0 removes the temp dir."""
        self.mgr._inflight_step = None
        if self.mgr.rank == 0 and not isinstance(exc, CheckpointError):
            self._discard()

    def _discard(self) -> None:
        try:
            if self.tmp.exists():
                storage.move_to_trash(self.tmp, self.mgr.trash)
                self.mgr._schedule_trash()
        except OSError as e:
            logger.warning("could not remove failed save's temp dir %s: %r", self.tmp, e)


def _mutates_in_forward(model: torch.nn.Module) -> bool:
    """True when a forward pass changes saved state in place (normalisation running stats)."""
    from torch.nn.modules.batchnorm import _NormBase

    return any(
        isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None
        for m in model.modules()
    )
