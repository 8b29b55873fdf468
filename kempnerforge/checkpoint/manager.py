"""Checkpoint policy: when a step saves, what a resume loads, and how a training loop stops.

Layout (owned by :mod:`~kempnerforge.checkpoint.storage`, see docs/checkpointing.md)::

    {dir}/latest -> step_N            relative symlink, swapped atomically after a commit
    {dir}/step_N/.metadata            DCP metadata (pipeline parallel: step_N/pp_K/.metadata)
    {dir}/step_N/__R_I.distcp         DCP shards
    {dir}/step_N/train_state/rank_00000.pt   per-rank train state (weights_only-loadable)
    {dir}/step_N/metadata.json        written last: step, tokens_seen, world_size, manifest, ...
    {dir}/.tmp_step_N-XXXXXXXX/       a save in progress (never loaded)
    {dir}/.trash/                     pruned or replaced steps awaiting background deletion

How bytes leave the device is :mod:`~kempnerforge.checkpoint.async_save`; the commit protocol and
retention are :mod:`~kempnerforge.checkpoint.commit`; which checkpoint resumes is
:mod:`~kempnerforge.checkpoint.resolve`; the stop path is :mod:`kempnerforge.resilience.stop`.
"""

from __future__ import annotations

import logging
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kempnerforge.checkpoint import exit_flush, storage
from kempnerforge.checkpoint.async_save import (
    AsyncCheckpointer,
    CheckpointError,
    SaveStats,
    _Worker,
)
from kempnerforge.checkpoint.commit import CommitJob, CommitPlan, Retention
from kempnerforge.checkpoint.config import CheckpointConfig
from kempnerforge.checkpoint.control import ControlGroup
from kempnerforge.checkpoint.guards import (
    check_compatible,
    check_dir_safety,
    explain_dcp_failure,
)
from kempnerforge.checkpoint.loaders import (
    guard_first_iter,
    loader_generator_state,
    restore_loader,
)
from kempnerforge.checkpoint.lock import JobLock, acquire_job_lock
from kempnerforge.checkpoint.reader import CheckpointReader
from kempnerforge.checkpoint.resolve import Resolution, find_resumable, resolve_explicit
from kempnerforge.checkpoint.safe_unpickle import SafeLoadPlanner, load_dcp_metadata
from kempnerforge.checkpoint.state import (
    build_train_state,
    read_train_state,
    reseed_rng,
    restore_train_state,
    serialize_train_state,
)
from kempnerforge.freeze import (
    FreezeConfig,
    all_trainable,
    apply_freeze,
    canonical_freeze_meta,
    effective_freeze,
)
from kempnerforge.resilience.config import ResilienceConfig

logger = logging.getLogger(__name__)

LOADABLE_KEYS = ("model", "optimizer")


class CheckpointManager:
    """Manages save/load/cleanup of distributed checkpoints.

    Each checkpoint lives in ``{dir}/step_{N}/`` (DCP shards + train state + metadata.json);
    ``{dir}/latest`` is a relative symlink to the most recently committed one. Works with a plain
    ``nn.Module`` in one process, and with FSDP2 / DDP under torchrun (checkpoints reshard).

    A training loop of any shape needs three calls: :meth:`resume` once, :meth:`maybe_save`
    after every optimizer step (it saves on schedule and turns a preemption signal into an
    agreed, durable stop), and ``sys.exit(mgr.exit_code)`` when it returns True.
    ``resilience`` configures the signals, the requeue guard and hang detection.
    """

    def __init__(
        self,
        config: CheckpointConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        process_group: Any | None = None,
        pp_rank: int | None = None,
        *,
        resilience: ResilienceConfig | None = None,
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
        self.resilience = resilience or ResilienceConfig()
        self.dir = Path(config.dir).absolute()
        self.trash = self.dir / storage.TRASH_DIR
        self.control = ControlGroup()
        self.rank, self.world_size = self.control.rank, self.control.world_size
        self._dist = self.control.distributed
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
                self._checkpointer._groups[None] = self.control.group  # DCP shares it
            else:
                self._checkpointer.dcp_group(process_group)  # collective: create it now, once
        self._retention = Retention(self.dir, config.keep_last_n, config.save_timeout_s)
        self._janitor: _Worker | None = None
        self._pending_dataloader_state: Any = None  # stashed by load() without a loader
        self._pending_loader_generator: torch.Tensor | None = None
        self._peeked: tuple[Any, Resolution] | None = None
        self._inflight_step: int | None = None
        self._last_save_step: int | None = None
        self._last_save_time = time.monotonic()
        self._lock: JobLock | None = None  # rank 0's, taken by resume() or the first save
        self._stop: Any = None  # the StopController, made by resume() / maybe_save()
        self._warned_loaders: set[type] = set()
        self.exit_code = 0
        if self.rank == 0:
            storage.make_dir(self.dir, config.dir_mode)
        exit_flush.track(self)

    # ------------------------------------------------------------------ properties
    @property
    def last_save_stats(self) -> SaveStats:
        """Figures of the most recent save on this rank (final once ``wait()`` returned)."""
        return self._checkpointer.last_stats

    @property
    def checkpointer(self) -> AsyncCheckpointer:
        return self._checkpointer

    @property
    def inflight_step(self) -> int | None:
        """The step of the async save still being written, or None once it ended."""
        return self._inflight_step

    def has_saved(self, step: int) -> bool:
        """A save of ``step`` was started by this manager (it may still be in flight)."""
        return self._last_save_step == int(step)

    def committed_step(self) -> int | None:
        """The step a resume would start from now (the resolver's answer); rank 0's view."""
        res = find_resumable(self.dir, "none") if self.dir.is_dir() else Resolution()
        return res.step

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

    # ------------------------------------------------------------------ the training-loop calls
    def resume(
        self,
        scheduler: Any | None = None,
        dataloader: Any | None = None,
        freeze: FreezeConfig | None = None,
    ) -> tuple[int, int, dict[str, Any]]:
        """Resume this run where its newest checkpoint stopped; ``(0, 0, {})`` on a fresh run.

        One call for the whole resume order: :meth:`peek_saved_step`, the freeze list in force
        at that step when a freeze schedule is given (applied to the model, and checked against
        the checkpoint), :meth:`load`, then :meth:`apply_dataloader_state`. It also takes this
        directory's job lock (a second job on the same directory is refused here, before it
        writes anything) and installs the stop-signal handlers :meth:`maybe_save` acts on.
        """
        self._ensure_stop_controller()
        self._ensure_lock()
        saved = self.peek_saved_step()
        expected = None
        if freeze is not None:
            # what step `saved` trained with: the list in force after saved - 1 steps
            in_force = effective_freeze(freeze, max((saved or 0) - 1, 0))
            apply_freeze(self.model, in_force)
            expected = canonical_freeze_meta(in_force)
        step, tokens, extra = self.load(scheduler=scheduler, vlm_freeze_expected=expected)
        if saved is not None and step != saved:
            raise RuntimeError(
                f"checkpoint metadata of {self.dir} says step {saved} but its train state holds "
                f"step {step}; the checkpoint is inconsistent"
            )
        self.apply_dataloader_state(dataloader)
        self._last_save_time = time.monotonic()
        return step, tokens, extra

    def maybe_save(
        self,
        step: int,
        tokens_seen: int = 0,
        scheduler: Any | None = None,
        dataloader: Any | None = None,
        extra: dict[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Call after every optimizer step; True means: stop now and ``sys.exit(self.exit_code)``.

        Saves when ``step % checkpoint.interval == 0`` (or ``checkpoint.interval_s`` passed, or
        ``force``: a loop's last step).
        When a stop signal reached any rank, every rank agrees on the same step (one tiny
        asynchronous all-reduce per step, read at the next step), saves it (unless already
        saved), makes ``latest`` durable, requeues under SLURM when the reason calls for it,
        and returns True with :attr:`exit_code` set.
        """
        stop = self._ensure_stop_controller()
        due = 0 < self.config.interval_s <= time.monotonic() - self._last_save_time
        kind, time_due = stop.step(int(step), due)

        def save_now() -> None:
            self.save(step, tokens_seen, scheduler, dataloader, extra)

        if kind:
            from kempnerforge.resilience.stop import run_stop, stop_reason

            here = stop.flag.signal_name
            self.exit_code = run_stop(self, int(step), stop_reason(self, kind), save_now, here)
            return True
        if force or step % self.config.interval == 0 or time_due:
            if stop.hang is not None:
                stop.hang.pause()  # a synchronous save is not a hung step
            try:
                save_now()
            except Exception as e:
                return self._save_failed(int(step), e)
            finally:
                if stop.hang is not None:
                    stop.hang.beat(int(step))
        return False

    def request_stop(self, signal_name: str = "manual") -> None:
        """Ask for a stop from code (a time budget, a signal caught elsewhere) as if this rank
        had received ``signal_name``: the next :meth:`maybe_save` calls agree on it and stop."""
        self._ensure_stop_controller().flag.request(signal_name)

    def _save_failed(self, step: int, error: Exception) -> bool:
        policy = self.resilience.on_save_error
        if policy == "raise":
            raise error
        if policy == "continue":
            logger.error(
                "checkpoint of step %d failed (%s); continuing (on_save_error)", step, error
            )
            return False
        from kempnerforge.resilience.reason import StopReason
        from kempnerforge.resilience.stop import run_stop

        reason = StopReason(
            "save-failed", False, True, f"checkpoint of step {step} failed: {error}"
        )
        self.exit_code = run_stop(self, step, reason, lambda: None)
        return True

    def _ensure_stop_controller(self) -> Any:
        if self._stop is None:
            from kempnerforge.resilience.stop import StopController, on_hang

            me = weakref.ref(self)

            def hang(message: str) -> int:
                mgr = me()
                return on_hang(mgr, message) if mgr is not None else 77

            self._stop = StopController(self.resilience, hang)
        return self._stop

    def _ensure_lock(self) -> None:
        """Rank 0 takes (or joins) the directory's job lock; every rank raises the same error."""
        problem: BaseException | None = None
        if self.rank == 0 and self._lock is None:
            try:
                self._take_lock()
            except Exception as e:
                problem = e
        problem = self.control.bcast(problem)
        if problem is not None:
            raise problem

    def _take_lock(self) -> None:
        check_dir_safety(self.dir, for_write=True, dir_mode=self.config.dir_mode)
        self._lock = acquire_job_lock(self.dir, dir_mode=self.config.dir_mode)
        weakref.finalize(self, self._lock.release)  # a manager dropped without close()
        if self.trash.is_dir() and any(self.trash.iterdir()):
            self._schedule_trash()  # left by an earlier run that did not wait for it

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
        background (``wait()`` to be sure; a save still in flight when the interpreter exits is
        finished then, or reported). A failure of the previous async save is raised here.
        """
        t0 = time.perf_counter()
        self._checkpointer.wait()
        self._peeked = None
        self._warn_stateless_loader(dataloader)
        state = build_train_state(step, tokens_seen, scheduler, dataloader, extra)
        gen = loader_generator_state(dataloader)
        if gen is not None:
            state["dataloader_generator"] = gen
        ts_bytes = serialize_train_state(state)  # RNG of step N, captured now
        token = self.control.bcast(self._prepare_save() if self.rank == 0 else None)
        if isinstance(token, BaseException):
            raise token  # every rank: directory unsafe or locked by another job
        tmp = self.dir / f"{storage.TMP_PREFIX}{int(step)}-{token}"
        dcp_dir = tmp / storage.pp_dir_name(self.pp_rank) if self.pp_rank is not None else tmp
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
        state_dict = self._state_dict()
        stateless = self._params_without_state(state_dict.get("optimizer"))
        if stateless:
            meta["optimizer_without_state"] = stateless
        plan = CommitPlan(int(step), self.dir, tmp, dcp_dir, ts_bytes, meta, t0)
        job = CommitJob(
            plan,
            self.control,
            lock=lambda: self._lock,
            stats=lambda: self._checkpointer.last_stats,
            after_commit=self._after_commit,
            on_end=self._save_ended,
            on_discard=self._schedule_trash,
        )
        self._inflight_step = self._last_save_step = int(step)
        self._last_save_time = time.monotonic()
        self._prepared = True  # buffers are allocated by this save if not before
        self._checkpointer.save(
            state_dict,
            str(dcp_dir),
            self.process_group,
            on_written=job.finish,
            on_failed=job.failed,
            step=int(step),
            t0=t0,
            digests=plan.digests,
            defer_copy=self._defer_copy,
            from_rank0=self._rank0_keys(state_dict),
        )

    def _params_without_state(self, optim_sd: Any) -> dict[str, list[str]]:
        """Parameters the optimizer holds no state for yet (it creates state at a parameter's
        first update), split by whether they are frozen now. A resume leaves exactly these
        stateless; any other state missing from the checkpoint is an error."""
        if not isinstance(optim_sd, dict) or not isinstance(optim_sd.get("state"), dict):
            return {}
        frozen = {
            _canonical_name(n) for n, p in self.model.named_parameters() if not p.requires_grad
        }
        names = [n for g in optim_sd.get("param_groups", []) for n in g.get("params", [])]
        missing = [n for n in names if isinstance(n, str) and n not in optim_sd["state"]]
        out = {
            "never_stepped": sorted(n for n in missing if n not in frozen),
            "frozen": sorted(n for n in missing if n in frozen),
        }
        return {k: v for k, v in out.items() if v}

    def _rank0_keys(self, state_dict: dict[str, Any]) -> frozenset[str]:
        """Flattened keys of replicated module buffers, written from rank 0's copy (see
        :class:`~kempnerforge.checkpoint.async_save.Rank0ReplicasPlanner`)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return frozenset()
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            DTensor = ()  # type: ignore[assignment]
        model_sd = state_dict.get("model", {})
        names = {_canonical_name(n) for n, _ in self.model.named_buffers()}
        return frozenset(
            f"model.{k}"
            for k, v in model_sd.items()
            if k in names and isinstance(v, torch.Tensor) and not isinstance(v, DTensor)
        )

    def _warn_stateless_loader(self, loader: Any) -> None:
        if loader is None or hasattr(loader, "state_dict"):
            return
        kind = type(loader)
        if kind in self._warned_loaders:
            return
        self._warned_loaders.add(kind)
        if self.rank == 0:
            logger.warning(
                "checkpoint: the dataloader (%s) has no state_dict(), so its position is not "
                "saved: a resumed run starts its data from the beginning of an epoch. Use "
                "torchdata's StatefulDataLoader (or give the loader state_dict/load_state_dict) "
                "for an exact resume.",
                f"{kind.__module__}.{kind.__qualname__}",
            )

    def _prepare_save(self) -> str | BaseException:
        """Rank 0, every save: the directory is ours to write and this job holds its lock.

        Returns the save's temp-dir token, or the exception every rank must raise (sent with
        the token broadcast the save needs anyway, so the check costs no extra collective).
        """
        try:
            check_dir_safety(self.dir, for_write=True, dir_mode=self.config.dir_mode)
            if self._lock is None:
                self._take_lock()
        except Exception as e:
            return e
        return uuid.uuid4().hex[:8]

    def _after_commit(self, committed: Path) -> None:
        protected = set()
        if self._inflight_step is not None:
            protected.add(storage.step_dir_name(self._inflight_step))
        if self._retention.prune(committed, protected):
            self._schedule_trash()

    def _save_ended(self) -> None:
        self._inflight_step = None

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
            if self._stop is not None:
                self._stop.close()
                self._stop = None
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

    # ------------------------------------------------------------------ load
    def _resolve(self, path: str | None, require_dcp: bool) -> Resolution:
        """Rank 0's view of what to load: explicit path > own dir's checkpoint > load_path."""
        verify = self.config.verify_on_load
        if path is not None:
            res = resolve_explicit(path, verify, require_dcp)
            res.source = "explicit"
        else:
            res = (
                find_resumable(self.dir, verify, require_dcp) if self.dir.is_dir() else Resolution()
            )
            res.source = "own"
            if res.error is not None and res.corrupt:
                res = self._all_corrupt(res)
            elif res.path is None and self.config.load_path:
                warnings = res.warnings
                res = resolve_explicit(self.config.load_path, verify, require_dcp)
                res.source = "load_path"
                res.warnings = warnings + res.warnings
            elif res.path is None:
                res.source = "none"
        if res.path is not None and Path(res.path).resolve().parent == self.dir.resolve():
            res.source = "own"
        return res

    def _all_corrupt(self, res: Resolution) -> Resolution:
        if self.config.on_all_corrupt != "start_fresh":
            return res
        logger.error(
            "CHECKPOINT RESUME SKIPPED: %s; checkpoint.on_all_corrupt=start_fresh, so this run "
            "TRAINS FROM STEP 0 beside them (they are kept and never pruned)",
            res.error,
        )
        return Resolution(source="none", warnings=res.warnings)

    def _resolve_agreed(
        self, path: str | None, use_peeked: bool = False, require_dcp: bool = True
    ) -> Resolution:
        """Rank 0 resolves, every rank gets the same answer (no stale per-rank FS views).

        ``load`` passes ``use_peeked``: it then loads exactly what the preceding
        ``peek_saved_step`` (same path argument, no save in between) reported.
        """
        key = (None if path is None else str(path), require_dcp)
        if use_peeked and self._peeked is not None and self._peeked[0] == key:
            res = self._peeked[1]
        else:
            self._checkpointer.join()  # the group must be idle; a failure stays for save()/wait()
            res = None
            if self.rank == 0:
                try:
                    res = self._resolve(path, require_dcp)
                except Exception as e:  # a filesystem error must not leave other ranks hanging
                    res = Resolution(error=f"resolving the checkpoint to load failed: {e!r}")
                for w in res.warnings:
                    logger.warning("checkpoint resume: %s", w)
            res = self.control.bcast(res)
        self._peeked = (key, res)
        return res

    def peek_saved_step(self, path: str | None = None) -> int | None:
        """Step of the checkpoint ``load(path)`` would load, or None. Never raises for a missing
        or unreadable checkpoint (every checkpoint of this run corrupt raises in ``load``);
        ``load`` then uses the very same directory."""
        try:
            res = self._resolve_agreed(path)
        except CheckpointError:
            raise
        except Exception as e:
            logger.warning("peek_saved_step: %r", e)
            return None
        if res.path is None:
            return None
        return res.step

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
        ``config.load_path``; ``(0, 0, {})`` when neither exists. Checkpoints written by the
        original KempnerForge (``train_state.pt``) load too. Raises when every committed
        checkpoint of this run's directory is unusable (naming each; see
        ``checkpoint.on_all_corrupt``) and when an explicit path does not exist or is incomplete.
        ``config.exclude_from_loading`` applies to checkpoints from elsewhere (``load_path`` / an
        explicit path outside ``dir``), never to this run's own resume, which must be exact.
        """
        excluded = set(exclude_keys or [])
        unknown = excluded - set(LOADABLE_KEYS)
        if unknown:
            raise ValueError(
                f"exclude_keys {sorted(unknown)} unknown; use any of {list(LOADABLE_KEYS)}"
            )
        need_dcp = not {"model", "optimizer"} <= excluded
        res = self._resolve_agreed(path, use_peeked=True, require_dcp=need_dcp)
        self._peeked = None
        if res.error is not None:
            raise FileNotFoundError(res.error)
        if res.path is None or res.meta is None:
            logger.info("no checkpoint to resume from under %s: starting fresh", self.dir)
            return 0, 0, {}
        step_dir, meta = Path(res.path), res.meta

        self._check_freeze(step_dir, meta, vlm_freeze_expected)
        if res.source != "own":
            excluded |= set(self.config.exclude_from_loading)

        dcp_dir = storage.dcp_dir(step_dir, self.pp_rank)
        sd: dict[str, Any] = {}
        if "model" not in excluded:
            sd["model"] = get_model_state_dict(self.model)
        if "optimizer" not in excluded and self.optimizer is not None:
            with all_trainable(self.model):
                sd["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        saved_ws = int(meta.get("world_size", self.world_size))
        same_world = saved_ws == self.world_size
        ts_file = storage.train_state_file(step_dir, self.rank if same_world else 0, saved_ws)
        self._agree_loadable(step_dir, dcp_dir, ts_file, sd, meta)
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
                # parameters that never stepped have no state to restore (see
                # _drop_state_never_saved): the shapes and keys were checked above
                with all_trainable(self.model):
                    set_optimizer_state_dict(
                        self.model,
                        self.optimizer,
                        sd["optimizer"],
                        options=StateDictOptions(strict=False),
                    )

        state = read_train_state(step_dir, self.rank if same_world else 0)
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
        loader_state = state.pop("dataloader", None)
        generator = state.pop("dataloader_generator", None)
        step, tokens, extra = restore_train_state(state, scheduler, None)
        self._pending_dataloader_state = loader_state
        self._pending_loader_generator = generator
        if dataloader is not None:
            self.apply_dataloader_state(dataloader)
        logger.info(
            "resumed from %s (step %d, tokens %d%s)",
            step_dir,
            step,
            tokens,
            f", excluded {sorted(excluded)}" if excluded else "",
        )
        return step, tokens, extra

    def _agree_loadable(
        self,
        step_dir: Path,
        dcp_dir: Path,
        ts_file: Path,
        sd: dict[str, Any],
        meta: dict[str, Any],
    ) -> None:
        """Before any state moves, every rank agrees the load can proceed.

        Each rank reports whether it sees the files it needs (its train state, DCP's metadata);
        rank 0 also checks the directory and compares keys and shapes through the restricted
        unpickler. One verdict comes back to every rank, so all raise the same error rather
        than some entering the collective load while others do not (a hang).
        """
        mine: list[str] = []
        if not ts_file.is_file():
            mine.append(str(ts_file))
        if sd and not (dcp_dir / storage.DCP_METADATA_FILE).is_file():
            mine.append(str(dcp_dir / storage.DCP_METADATA_FILE))
        views = self.control.gather((self.rank, mine))
        problem: BaseException | None = None
        if self.rank == 0:
            assert views is not None
            missing = [(r, f) for r, files in views for f in files]
            if missing:
                seen = "; ".join(f"rank {r} cannot see {f}" for r, f in missing)
                problem = FileNotFoundError(
                    f"checkpoint {step_dir} is incomplete for this job: {seen}. If the file is "
                    "there on other nodes, the shared filesystem is not consistent yet (wait "
                    "and rerun); otherwise load another step or delete this one."
                )
            else:
                try:
                    check_dir_safety(step_dir.parent, for_write=False)
                    if sd:
                        md = load_dcp_metadata(dcp_dir)
                        self._drop_state_never_saved(sd, md, meta)
                        check_compatible(dcp_dir, sd, md)
                except Exception as e:
                    problem = e
        problem = self.control.bcast(problem)
        if problem is not None:
            raise problem
        if sd and self.rank != 0:
            self._drop_state_never_saved(sd, load_dcp_metadata(dcp_dir), meta)

    def _drop_state_never_saved(self, sd: dict[str, Any], md: Any, meta: dict[str, Any]) -> None:
        """Leave out optimizer state the checkpoint records as never created.

        A parameter that never got a gradient (unused so far, or frozen from the start) has no
        optimizer state in the checkpoint and must have none after the resume; the save recorded
        which ones (``optimizer_without_state``). A frozen one stays stateless only while it is
        still frozen. Anything else missing stays in, and the compatibility check names it.
        """
        optim = sd.get("optimizer")
        if optim is None:
            return
        if isinstance(md.state_dict_metadata.get("optimizer"), BytesStorageMetadata):
            sd["optimizer"] = b""  # one opaque entry (an older DCP writer): loaded whole
            return
        if not isinstance(optim, dict) or not isinstance(optim.get("state"), dict):
            return
        record = meta.get("optimizer_without_state") or {}
        frozen_now = {
            _canonical_name(n) for n, p in self.model.named_parameters() if not p.requires_grad
        }
        allowed = set(record.get("never_stepped", [])) | (
            set(record.get("frozen", [])) & frozen_now
        )
        for name in list(optim["state"]):
            if name in allowed and not any(
                k.startswith(f"optimizer.state.{name}.") for k in md.state_dict_metadata
            ):
                del optim["state"][name]

    def _check_freeze(
        self, step_dir: Path, meta: dict[str, Any], expected: list[dict[str, Any]] | None
    ) -> None:
        """Compare the freeze list saved with the checkpoint and the one this run expects.

        Only modules both lists name are compared (a module one architecture has and the other
        lacks cannot disagree); the message lists the ones left out on each side.
        """
        saved = meta.get("vlm_freeze")
        if saved is None or expected is None:
            return
        s = {e["module"]: bool(e["frozen"]) for e in saved}
        x = {e["module"]: bool(e["frozen"]) for e in expected}
        shared = sorted(s.keys() & x.keys())
        if all(s[m] == x[m] for m in shared):
            return
        saved_only, current_only = sorted(s.keys() - x.keys()), sorted(x.keys() - s.keys())
        msg = (
            f"VLM freeze mismatch at {step_dir}: "
            f"saved={[{'module': m, 'frozen': s[m]} for m in shared]}, "
            f"current={[{'module': m, 'frozen': x[m]} for m in shared]}"
        )
        if saved_only or current_only:
            msg += (
                f" (cross-arch keys ignored: saved-only={saved_only}, current-only={current_only})"
            )
        if self.config.ignore_freeze_mismatch:
            logger.warning("%s; proceeding because checkpoint.ignore_freeze_mismatch=true", msg)
            return
        raise ValueError(msg + " (set checkpoint.ignore_freeze_mismatch=true to override)")

    def apply_dataloader_state(self, dataloader: Any) -> None:
        """Apply dataloader state stashed by a ``load()`` that had no loader; clear the stash.

        The loader's position is restored through its ``load_state_dict``, and its first
        ``iter()`` afterwards leaves the global torch RNG (and the loader's ``generator``) exactly
        as they were saved, so the draws a new iterator makes do not shift what the training
        step draws next (Dropout masks): an uninterrupted run made those draws before the save.
        """
        loader_state, self._pending_dataloader_state = self._pending_dataloader_state, None
        generator, self._pending_loader_generator = self._pending_loader_generator, None
        if dataloader is None or (loader_state is None and generator is None):
            return
        restore_loader(dataloader, loader_state)
        guard_first_iter(dataloader, generator)


def _canonical_name(name: str) -> str:
    """A module's buffer name as the model state dict spells it (wrappers' prefixes removed)."""
    for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def _mutates_in_forward(model: torch.nn.Module) -> bool:
    """True when a forward pass changes saved state in place (normalisation running stats)."""
    from torch.nn.modules.batchnorm import _NormBase

    return any(
        isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None
        for m in model.modules()
    )
