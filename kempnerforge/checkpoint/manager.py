"""Checkpoint policy: when a step saves, what a resume loads, and how a training loop stops.

Layout (owned by :mod:`~kempnerforge.checkpoint.storage`, see docs/checkpointing.md)::

    {dir}/latest -> step_N            relative symlink, swapped atomically after a commit
    {dir}/step_N/.metadata            DCP metadata (pipeline parallel: step_N/pp_K/.metadata)
    {dir}/step_N/__R_I.distcp         DCP shards: model, optimizer, the handed-over states' tensors
    {dir}/step_N/train_state/rank_00000.pt   per-rank train state (weights_only-loadable)
    {dir}/step_N/metadata.json        written last: step, tokens_seen, world_size, manifest, ...
    {dir}/.tmp_step_N-XXXXXXXX/       a save in progress (never loaded)
    {dir}/.trash/                     pruned or replaced steps awaiting background deletion

The manager decides; the other modules do: :mod:`~kempnerforge.checkpoint.assemble` builds what
a save writes, :mod:`~kempnerforge.checkpoint.async_save` moves the bytes off the device,
:mod:`~kempnerforge.checkpoint.commit` makes them durable and prunes,
:mod:`~kempnerforge.checkpoint.loading` chooses, agrees on and loads a checkpoint, and
:mod:`kempnerforge.resilience` answers whether to stop, why, and whether the job runs again.
"""

from __future__ import annotations

import logging
import sys
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from kempnerforge import exit_codes
from kempnerforge.checkpoint import exit_flush, storage
from kempnerforge.checkpoint.assemble import (
    assemble,
    dcp_state_dict,
    mutates_in_forward,
    temp_dirs,
)
from kempnerforge.checkpoint.async_save import (
    AsyncCheckpointer,
    CheckpointError,
    SaveStats,
    _Worker,
)
from kempnerforge.checkpoint.commit import CommitJob, CommitPlan, Retention
from kempnerforge.checkpoint.config import CheckpointConfig
from kempnerforge.checkpoint.control import ControlGroup
from kempnerforge.checkpoint.loaders import guard_first_iter, restore_loader
from kempnerforge.checkpoint.loading import CheckpointLoader, Loaded
from kempnerforge.checkpoint.owner import DirOwner
from kempnerforge.checkpoint.resolve import Resolution, find_resumable
from kempnerforge.checkpoint.stateful import capture, check_states
from kempnerforge.freeze import FreezeConfig, apply_freeze, canonical_freeze_meta, effective_freeze
from kempnerforge.ledger import Ledger
from kempnerforge.resilience import stop as stopping
from kempnerforge.resilience.config import ResilienceConfig
from kempnerforge.resilience.reason import StopReason
from kempnerforge.resilience.watchdog import SaveWatchdog

logger = logging.getLogger(__name__)


class CheckpointManager:
    """Manages save/load/cleanup of distributed checkpoints.

    Each checkpoint lives in ``{dir}/step_{N}/`` (DCP shards + train state + metadata.json);
    ``{dir}/latest`` is a relative symlink to the most recently committed one. Works with a plain
    ``nn.Module`` in one process, and with FSDP2 / DDP under torchrun (checkpoints reshard).

    A training loop of any shape needs three calls: :meth:`resume` once, :meth:`maybe_save`
    after every optimizer step (it saves on schedule and turns a preemption signal into an
    agreed, durable stop), and ``sys.exit(mgr.exit_code)`` when it returns True.
    ``states`` hands over, once, any other object with ``state_dict`` / ``load_state_dict``
    (a GradScaler, an EMA model, a data loader, a scheduler, your own counters): every save
    saves them and :meth:`resume` restores them. ``resilience`` configures the signals, the
    requeue guard and hang detection.
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
        states: Mapping[str, Any] | None = None,
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
        self.states = check_states(states)
        self.dir = Path(config.dir).absolute()
        self.trash = self.dir / storage.TRASH_DIR
        self.control = ControlGroup()
        self.rank, self.world_size = self.control.rank, self.control.world_size
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
            if mutates_in_forward(model):  # e.g. BatchNorm running stats live in the state
                self._hooks.append(model.register_forward_pre_hook(self._before_forward))
        if self._checkpointer.is_async and self.control.distributed:
            if process_group is None:
                self._checkpointer._groups[None] = self.control.group  # DCP shares it
            else:
                self._checkpointer.dcp_group(process_group)  # collective: create it now, once
        self._loader = CheckpointLoader(
            config=config,
            root=self.dir,
            model=model,
            optimizer=optimizer,
            states=self.states,
            control=self.control,
            checkpointer=self._checkpointer,
            process_group=process_group,
            pp_rank=pp_rank,
        )
        self._retention = Retention(self.dir, config.keep_last_n, config.save_timeout_s)
        self._janitor: _Worker | None = None
        self._pending_loaders = Loaded()  # positions load() kept for loaders not yet built
        self._inflight_step: int | None = None
        self._last_save_step: int | None = None
        self._last_save_time = time.monotonic()
        self._owner = DirOwner(self.dir, config.dir_mode, self.control, self._trash_left_over)
        self._stop: stopping.StopController | None = None  # made by resume() / maybe_save()
        self.ledger = Ledger(self.dir, rank=self.rank)  # events.jsonl: starts, saves, stops
        self._started = self._ended = False
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
        """The step of the save still being written, or None once it ended."""
        return self._inflight_step

    @property
    def _pending_dataloader_state(self) -> Any:
        """The original KempnerForge's name for the loader position ``load()`` stashed."""
        return self._pending_loaders.loader_state

    @_pending_dataloader_state.setter
    def _pending_dataloader_state(self, state: Any) -> None:
        self._pending_loaders.loader_state = state

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
        state_dict = dcp_state_dict(self.model, self.optimizer, capture(self.states))
        return self._checkpointer.prepare(state_dict)

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
        the checkpoint), :meth:`load` (the handed-over ``states`` included), then
        :meth:`apply_dataloader_state`. It also takes this directory's job lock (a second job on
        the same directory is refused here, before it writes anything) and installs the
        stop-signal handlers :meth:`maybe_save` acts on.
        """
        self._ensure_stop_controller()
        self._owner.claim()
        saved = self.peek_saved_step()
        self._start_run(saved)
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
        if not self._started:
            self._start_run(None)
        self.ledger.step_reached(int(step))
        due = 0 < self.config.interval_s <= time.monotonic() - self._last_save_time
        kind, time_due = stop.step(int(step), due)

        def save_now() -> None:
            self.save(step, tokens_seen, scheduler, dataloader, extra)

        if kind:
            # the control group carries a background save's collectives: it must be idle before
            # this rank issues one of its own (a failure stays for the stop's wait() to report)
            self._checkpointer.join()
            reason = self.control.bcast(
                stopping.classify(kind, self.resilience) if self.rank == 0 else None
            )
            self._stop_run(int(step), reason, save_now, stop.flag.signal_name)
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

    def _start_run(self, resumed_step: int | None) -> None:
        if not self._started:
            self._started = True
            self.ledger.start(world_size=self.world_size, resumed_step=resumed_step)

    def request_stop(self, signal_name: str = "manual") -> None:
        """Ask for a stop from code (a time budget, a signal caught elsewhere) as if this rank
        had received ``signal_name``: the next :meth:`maybe_save` calls agree on it and stop."""
        self._ensure_stop_controller().flag.request(signal_name)

    # ------------------------------------------------------------------ the stop tail
    def _stop_run(
        self,
        step: int,
        reason: StopReason,
        save: Callable[[], None],
        signal_name: str | None = None,
    ) -> None:
        """Every rank: save ``step`` (unless saved), make ``latest`` durable, then rank 0 asks
        for another run when ``reason`` calls for it; sets :attr:`exit_code` (the broadcast is the
        barrier: the requeue happened before any task exits)."""
        cfg = self.resilience
        saved = "not-needed"

        def on_timeout() -> int:
            if self.rank != 0:
                return cfg.exit_code
            return stopping.requeue_code(cfg, self.dir, self.committed_step())

        t0 = time.perf_counter()
        with SaveWatchdog(cfg.save_watchdog_s, f"stop save of step {step}", on_timeout):
            try:
                self.wait()  # an earlier save's failure must not keep this one from being tried
            except Exception as e:
                logger.error("an earlier checkpoint save failed: %s", e)
            try:
                if reason.save:
                    if not self.has_saved(step):
                        save()
                    saved = "yes"
                self.wait()
            except Exception as e:  # a failed stop save: `latest` is the previous checkpoint
                saved = "failed"
                logger.error("stop save of step %d failed: %s", step, e)
        code, requeue = exit_codes.OK, "not-needed"
        if self.rank == 0:
            if reason.requeue:
                code = stopping.requeue_code(cfg, self.dir, self.committed_step())
                requeue = stopping.requeue_outcome(cfg, code)
            elif reason.kind == "requeued":
                code = cfg.exit_code  # the cluster runs it again
            stopping.log_stop_line(
                reason, signal_name, step, saved, requeue, code, time.perf_counter() - t0
            )
            self.ledger.stop(step, reason=reason.kind, exit_code=code, saved=saved)
        self._ended = True
        self.exit_code = int(self.control.bcast(code))
        self.close(wait_for_trash=False)

    def _save_failed(self, step: int, error: Exception) -> bool:
        policy = self.resilience.on_save_error
        if policy == "raise":
            raise error
        if policy == "continue":
            logger.error(
                "checkpoint of step %d failed (%s); continuing (on_save_error)", step, error
            )
            return False
        reason = StopReason(
            "save-failed", False, True, f"checkpoint of step {step} failed: {error}"
        )
        self._stop_run(step, reason, lambda: None)
        return True

    def _ensure_stop_controller(self) -> stopping.StopController:
        if self._stop is None:
            me = weakref.ref(self)

            def on_hang(message: str) -> int:
                mgr = me()
                if mgr is None:
                    return exit_codes.HANG
                code = stopping.hang_exit_code(
                    mgr.resilience, mgr.rank, mgr.dir, mgr.committed_step, message
                )
                step = mgr.ledger.last_step
                mgr.ledger.stop(step or 0, reason="hang", exit_code=code, saved="no")
                mgr._ended = True
                return code

            self._stop = stopping.StopController(self.resilience, on_hang)
        return self._stop

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        tokens_seen: int = 0,
        scheduler: Any | None = None,
        dataloader: Any | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Save a checkpoint at ``step`` (with every handed-over state).

        Sync mode: returns once ``latest`` points at the durable ``step_{step}``. Async modes:
        returns once the state is staged in host memory; the write and commit finish in the
        background (``wait()`` to be sure; a save still in flight when the interpreter exits is
        finished then, or reported). A failure of the previous async save is raised here.
        """
        t0 = time.perf_counter()
        self._checkpointer.wait()
        self._loader.forget_peek()
        self._warn_stateless_loader(dataloader)
        parts = assemble(
            model=self.model,
            optimizer=self.optimizer,
            captured=capture(self.states),
            step=int(step),
            tokens_seen=int(tokens_seen),
            scheduler=scheduler,
            dataloader=dataloader,
            extra=extra,
            world_size=self.world_size,
            async_mode=self.config.async_mode.value,
            pp_rank=self.pp_rank,
        )
        token = self.control.bcast(self._owner.save_token() if self.rank == 0 else None)
        if isinstance(token, BaseException):
            raise token  # every rank: directory unsafe or locked by another job
        tmp, dcp_dir = temp_dirs(self.dir, int(step), token, self.pp_rank)
        storage.make_dir(tmp / storage.TRAIN_STATE_DIR, self.config.dir_mode)
        storage.make_dir(dcp_dir, self.config.dir_mode)
        plan = CommitPlan(int(step), self.dir, tmp, dcp_dir, parts.train_state, parts.meta, t0)
        job = CommitJob(
            plan,
            self.control,
            lock=lambda: self._owner.lock,
            stats=lambda: self._checkpointer.last_stats,
            after_commit=self._after_commit,
            on_end=self._save_ended,
            on_discard=self._schedule_trash,
        )
        self._inflight_step = self._last_save_step = int(step)
        self._last_save_time = time.monotonic()
        self._prepared = True  # buffers are allocated by this save if not before
        self._checkpointer.save(
            parts.state_dict,
            str(dcp_dir),
            self.process_group,
            on_written=job.finish,
            on_failed=job.failed,
            step=int(step),
            t0=t0,
            digests=plan.digests,
            defer_copy=self._defer_copy,
            from_rank0=parts.from_rank0,
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

    def _after_commit(self, committed: Path) -> None:
        stats = self._checkpointer.last_stats
        self.ledger.save(
            stats.step,
            blocked_s=stats.blocked_s,
            durable_s=stats.durable_s,
            nbytes=stats.total_bytes or stats.bytes,
        )
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
        Calling ``close`` again is harmless. Closed while no exception is on its way (the run
        finished), the ledger records the run's end.
        """
        if self._started and not self._ended and sys.exc_info()[1] is None:
            self._ended = True
            self.ledger.end(self.ledger.last_step, exit_code=self.exit_code)
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
            self._owner.release()

    def _trash_left_over(self) -> None:
        if self.trash.is_dir() and any(self.trash.iterdir()):
            self._schedule_trash()  # left by an earlier run that did not wait for it

    def _schedule_trash(self) -> None:
        if self._janitor is None:
            self._janitor = _Worker("kempnerforge-ckpt-trash")
        trash = self.trash
        self._janitor.submit(lambda: storage.empty_trash(trash))

    # ------------------------------------------------------------------ load
    def peek_saved_step(self, path: str | None = None) -> int | None:
        """Step of the checkpoint ``load(path)`` would load, or None. Never raises for a missing
        or unreadable checkpoint (every checkpoint of this run corrupt raises in ``load``);
        ``load`` then uses the very same directory."""
        try:
            res = self._loader.resolve_agreed(path)
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
        ``config.load_path``; ``(0, 0, {})`` when neither exists. The handed-over ``states`` are
        restored too (a data loader among them once it is iterated: see
        :meth:`apply_dataloader_state`). Checkpoints written by the original KempnerForge
        (``train_state.pt``) load too. Raises when every committed checkpoint of this run's
        directory is unusable (naming each; see ``checkpoint.on_all_corrupt``) and when an
        explicit path does not exist or is incomplete. ``config.exclude_from_loading`` applies to
        checkpoints from elsewhere (``load_path`` / an explicit path outside ``dir``), never to
        this run's own resume, which must be exact.
        """
        loaded = self._loader.load(path, scheduler, set(exclude_keys or []), vlm_freeze_expected)
        self._pending_loaders = loaded
        for name, entry in loaded.state_loaders.items():
            restore_loader(self.states[name], entry.get("state"))
            guard_first_iter(self.states[name], entry.get("generator"))
        loaded.state_loaders = {}
        if dataloader is not None:
            self.apply_dataloader_state(dataloader)
        return loaded.step, loaded.tokens_seen, loaded.extra

    def apply_dataloader_state(self, dataloader: Any) -> None:
        """Apply dataloader state stashed by a ``load()`` that had no loader; clear the stash.

        The loader's position is restored through its ``load_state_dict``, and its first
        ``iter()`` afterwards leaves the global torch RNG (and the loader's ``generator``) exactly
        as they were saved, so the draws a new iterator makes do not shift what the training
        step draws next (Dropout masks): an uninterrupted run made those draws before the save.
        """
        pending, self._pending_loaders = self._pending_loaders, Loaded()
        state, generator = pending.loader_state, pending.loader_generator
        if dataloader is None or (state is None and generator is None):
            return
        restore_loader(dataloader, state)
        guard_first_iter(dataloader, generator)
