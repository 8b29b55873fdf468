"""This job's claim on a checkpoint directory: safe to write into, and held under the job lock.

Rank 0 checks and locks; every rank learns the outcome, so a refusal (another job holds the
directory, it is writable by others) raises the same error everywhere before anything is written.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

from kempnerforge.checkpoint.control import ControlGroup
from kempnerforge.checkpoint.guards import check_dir_safety
from kempnerforge.checkpoint.lock import JobLock, acquire_job_lock


class DirOwner:
    """Rank 0's lock on ``root`` (taken by ``claim`` or the first save's ``save_token``)."""

    def __init__(
        self, root: Path, dir_mode: int, control: ControlGroup, on_taken: Callable[[], None]
    ) -> None:
        self.root = root
        self.dir_mode = dir_mode
        self.control = control
        self._on_taken = on_taken  # e.g. empty what an earlier run left in the trash
        self.lock: JobLock | None = None

    def claim(self) -> None:
        """Collective: rank 0 takes (or joins) the lock; every rank raises the same error."""
        problem: BaseException | None = None
        if self.control.rank == 0 and self.lock is None:
            try:
                self._take()
            except Exception as e:
                problem = e
        problem = self.control.bcast(problem)
        if problem is not None:
            raise problem

    def save_token(self) -> str | BaseException:
        """Rank 0, every save: the directory is ours to write and this job holds its lock.

        Returns the save's temp-dir token, or the exception every rank must raise (sent with
        the token broadcast the save needs anyway, so the check costs no extra collective).
        """
        try:
            check_dir_safety(self.root, for_write=True, dir_mode=self.dir_mode)
            if self.lock is None:
                self._take()
        except Exception as e:
            return e
        return uuid.uuid4().hex[:8]

    def _take(self) -> None:
        check_dir_safety(self.root, for_write=True, dir_mode=self.dir_mode)
        self.lock = acquire_job_lock(self.root, dir_mode=self.dir_mode)
        weakref.finalize(self, self.lock.release)  # a manager dropped without close()
        self._on_taken()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
