"""The commit protocol of one save, and retention: what happens after DCP wrote its shards.

Every rank writes into the save's temp dir (DCP shards, fsynced by DCP and checksummed as they
were written; the train state by temp + fsync + rename) and sends its part of the manifest to
rank 0. Rank 0 writes ``metadata.json`` (temp + fsync + rename), renames the temp dir to
``step_N`` (swapping atomically with an existing ``step_N``), fsyncs the root, swaps ``latest``,
fsyncs again, then broadcasts the outcome: no rank returns before ``latest`` is durable, and a
directory named ``step_N`` is always complete.

Everything the protocol needs comes in as arguments (the control group, the job lock, where to
report figures); it never reaches into the manager.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from kempnerforge.checkpoint import storage
from kempnerforge.checkpoint.async_save import CheckpointError, SaveStats
from kempnerforge.checkpoint.control import ControlGroup
from kempnerforge.checkpoint.guards import diagnose_write_failure
from kempnerforge.checkpoint.lock import JobLock
from kempnerforge.checkpoint.resolve import check_step
from kempnerforge.log import progress

logger = logging.getLogger(__name__)


@dataclass
class CommitPlan:
    """One save: where its files are and what its ``metadata.json`` starts from."""

    step: int
    root: Path
    tmp: Path
    dcp_dir: Path
    ts_bytes: bytes
    meta: dict[str, Any]
    t0: float
    # (size, xxh3_64) of each file DCP wrote, by name, hashed while it was written
    digests: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def final(self) -> Path:
        return self.root / storage.step_dir_name(self.step)

    @property
    def trash(self) -> Path:
        return self.root / storage.TRASH_DIR


class CommitJob:
    """Runs after DCP finished (in the background thread in async modes).

    ``stats`` returns the save's figures to complete; ``after_commit`` runs on rank 0 once
    ``latest`` moved (retention); ``on_end`` runs on every rank when the save is over, committed
    or not; ``on_discard`` runs on rank 0 after a failed save's temp dir went to the trash.
    """

    def __init__(
        self,
        plan: CommitPlan,
        control: ControlGroup,
        *,
        lock: Callable[[], JobLock | None],
        stats: Callable[[], SaveStats],
        after_commit: Callable[[Path], None],
        on_end: Callable[[], None],
        on_discard: Callable[[], None],
    ) -> None:
        self.plan = plan
        self.control = control
        self._lock = lock
        self._stats = stats
        self._after_commit = after_commit
        self._on_end = on_end
        self._on_discard = on_discard

    def _known(self) -> dict[str, tuple[int, str]]:
        sub = self.plan.dcp_dir.relative_to(self.plan.tmp)
        return {(sub / name).as_posix(): v for name, v in self.plan.digests.items()}

    def _local(self, group: Any) -> tuple[str | None, dict[str, Any]]:
        """Write this rank's train state and checksum the files this rank wrote."""
        plan, rank = self.plan, self.control.rank
        try:
            storage.test_pause("dcp_written", rank)
            rel_ts = storage.train_state_name(rank)
            storage.atomic_write_bytes(
                plan.tmp / rel_ts, plan.ts_bytes, pause_point="train_state_write", rank=rank
            )
            if self.control.distributed:
                grank = dist.get_rank(group) if group is not None else dist.get_rank()
            else:
                grank = 0
            prefix = f"__{grank}_"
            sub = plan.dcp_dir.relative_to(plan.tmp)
            own = [rel_ts] + [
                (sub / f.name).as_posix()
                for f in plan.dcp_dir.iterdir()
                if f.name.startswith(prefix)
            ]
            return None, storage.manifest_entries(plan.tmp, own, self._known())
        except Exception as e:
            return f"rank {rank}: {e!r}", {}

    def _commit(self, parts: list[Any]) -> tuple[bool, str, int]:
        """Rank 0: complete the manifest, write metadata.json, rename, swap ``latest``."""
        errors = [err for err, _ in parts if err]
        if errors:
            return False, "; ".join(errors), 0
        plan = self.plan
        lock = self._lock()
        if lock is not None:
            lock.check()  # another job took the directory over: do not commit into it
        files: dict[str, Any] = {}
        for _, entries in parts:
            files.update(entries)
        rest = [
            f for f in storage.list_files(plan.tmp) if f not in files and f != storage.METADATA_FILE
        ]
        # .metadata (hashed while rank 0 wrote it) and anything unclaimed
        files.update(storage.manifest_entries(plan.tmp, rest, self._known()))
        for d in {plan.tmp, plan.tmp / storage.TRAIN_STATE_DIR, plan.dcp_dir}:
            storage.fsync_dir(d)
        now = time.time_ns()
        meta = dict(plan.meta)
        meta["saved_at"] = _dt.datetime.fromtimestamp(now / 1e9, _dt.timezone.utc).isoformat()
        meta["saved_at_ns"] = now
        meta["manifest"] = {"algorithm": storage.CHECKSUM_ALGO, "files": files}
        storage.atomic_write_json(plan.tmp / storage.METADATA_FILE, meta)
        storage.test_pause("pre_commit", self.control.rank)
        storage.commit_dir(plan.tmp, plan.final, plan.trash)
        storage.atomic_symlink(plan.final.name, plan.root / storage.LATEST, rank=self.control.rank)
        return True, "", sum(int(e["size"]) for e in files.values())

    def finish(self, group: Any) -> None:
        plan, control = self.plan, self.control
        try:
            parts = control.gather(self._local(group))
            outcome: tuple[bool, str, int] = (False, "", 0)
            if control.rank == 0:
                assert parts is not None
                try:
                    outcome = self._commit(parts)
                except Exception as e:
                    outcome = (False, f"rank 0 commit: {e!r}", 0)
                if not outcome[0]:
                    self.discard()
                    outcome = (False, f"{outcome[1]}; {diagnose_write_failure(plan.root)}", 0)
            ok, msg, total = control.bcast(
                outcome
            )  # the barrier: `latest` moved before anyone returns
            if not ok:
                raise CheckpointError(
                    f"checkpoint step {plan.step} was not committed ({msg}); `latest` still "
                    "points at the previous checkpoint"
                )
            self._record(total)
            if control.rank == 0:
                try:
                    self._after_commit(plan.final)
                except Exception as e:  # pruning must never fail a committed save
                    logger.warning("retention after step %d failed: %r", plan.step, e)
        finally:
            self._on_end()

    def _record(self, total: int) -> None:
        plan, stats = self.plan, self._stats()
        stats.durable_s = time.perf_counter() - plan.t0
        if stats.mode == "disabled":
            stats.blocked_s = stats.durable_s
        stats.total_bytes = total
        stats.gbps = (total or stats.bytes) / max(stats.durable_s, 1e-9) / 1e9
        stats.committed = True
        stats.path = str(plan.final)
        if self.control.rank == 0:
            logger.info(
                "checkpoint step=%d bytes=%d blocked=%.3fs durable=%.3fs rate=%.2fGB/s mode=%s "
                "new_host_bytes=%d path=%s",
                plan.step,
                total,
                stats.blocked_s,
                stats.durable_s,
                stats.gbps,
                stats.mode,
                stats.new_host_bytes,
                stats.path,
            )
            progress(
                "saved step %d (%s, %s; training blocked %.3fs, durable after %.2fs)",
                plan.step,
                stats.path,
                storage.human_bytes(total or stats.bytes),
                stats.blocked_s,
                stats.durable_s,
            )

    def failed(self, exc: BaseException) -> None:
        """DCP itself failed (every rank raises together): rank 0 removes the temp dir."""
        try:
            if self.control.rank == 0 and not isinstance(exc, CheckpointError):
                self.discard()
        finally:
            self._on_end()

    def discard(self) -> None:
        try:
            if self.plan.tmp.exists():
                storage.move_to_trash(self.plan.tmp, self.plan.trash)
                self._on_discard()
        except OSError as e:
            logger.warning("could not remove failed save's temp dir %s: %r", self.plan.tmp, e)


@dataclass
class Retention:
    """Keep the ``keep_last_n`` most recently committed usable steps of ``root`` (rank 0).

    Never touches ``latest``'s target, a protected name (the step just committed or in flight),
    a directory that is not ``step_<int>``, or a step that fails verification (it stays for a
    person to inspect; ``kempnerforge ckpt prune`` removes it on request). Pruned dirs are renamed
    into ``.trash`` (instant) and deleted later by the caller's background thread. Temp dirs of
    saves older than twice ``save_timeout_s`` (dead by the watchdog's definition) go too.
    """

    root: Path
    keep_last_n: int
    save_timeout_s: float
    _reported: set[str] = field(default_factory=set)

    def prune(self, committed: Path, protected: set[str]) -> bool:
        """Returns True when ``.trash`` has something to delete."""
        storage.test_pause("retention", 0)
        trash = self.root / storage.TRASH_DIR
        now = time.time()
        for child in self.root.iterdir():
            if child.name.startswith(storage.TMP_PREFIX) and child.is_dir():
                try:
                    if now - child.stat().st_mtime > 2 * self.save_timeout_s:
                        storage.move_to_trash(child, trash)
                except OSError:
                    pass
        n = self.keep_last_n
        if n > 0:
            latest, _ = storage.read_latest(self.root)
            keep = {committed.name, *protected}
            if latest is not None:
                keep.add(latest.name)
            ranked = []
            for _step, p in storage.list_step_dirs(self.root):
                meta, problem = check_step(p, "size")
                if problem:
                    if p.name not in self._reported:
                        self._reported.add(p.name)
                        logger.warning("retention: leaving %s alone (%s)", p, problem)
                    continue
                assert meta is not None
                ranked.append((storage.commit_time_ns(p, meta), _step, p))
            ranked.sort(key=lambda x: (x[0], x[1]))
            for _t, _s, p in ranked[: max(0, len(ranked) - n)]:
                if p.name in keep:
                    continue
                storage.move_to_trash(p, trash)
                logger.info("retention: pruned %s (keep_last_n=%d, by commit order)", p, n)
            storage.fsync_dir(self.root)
        return trash.is_dir() and any(trash.iterdir())
