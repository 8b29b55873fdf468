"""One answer to "which checkpoint resumes": used by the manager, ``kempnerforge ckpt`` and the
launcher's ``--status``, so that none of them can disagree about a directory.

A step directory is usable when its ``metadata.json`` reads, DCP's ``.metadata`` is there (in the
step, or in every pipeline stage's sub-directory), its manifest's files are present at their sizes
(``verify="size"``, the default) or checksums (``"full"``), and the train state is there. Both this
project's layout and the original KempnerForge's (``train_state.pt``) are understood.

Resume order under a checkpoint root: ``latest`` first, else the most recently committed usable
step (by commit time in ``metadata.json``, then step number). When step directories exist but none
is usable, the answer is an error naming each one and why: a job must not silently start over
from step 0 on top of checkpoints a person may want to inspect.

No torch here: the launcher imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kempnerforge.checkpoint import storage


@dataclass
class Resolution:
    """What a resume would load: ``path`` (a step dir) and its metadata, or why nothing / error.

    ``corrupt``: the step directories that exist but cannot be used, with the reason each.
    """

    path: str | None = None
    meta: dict[str, Any] | None = None
    error: str | None = None
    source: str = "none"  # "own" (this manager's dir) | "load_path" | "explicit" | "none"
    warnings: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        """The step ``metadata.json`` names (None: nothing resolved, or the step is unknown)."""
        if not self.meta or not isinstance(self.meta.get("step"), int):
            return None
        return int(self.meta["step"])


@dataclass
class StepEntry:
    """One directory that looks like a checkpoint: a committed-looking ``step_N`` or an
    interrupted ``.tmp_step_N-*``. ``problem`` says why it is not usable ("" when it is)."""

    path: Path
    step: int
    committed: bool
    problem: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.committed and not self.problem

    @property
    def corrupt(self) -> bool:
        """Committed, yet unusable: what a person must look at (never pruned, never skipped
        silently). An interrupted save is not corrupt."""
        return self.committed and bool(self.problem)

    @property
    def commit_time(self) -> float:
        """Unix time of the commit (recency, not step number, orders checkpoints)."""
        if self.committed and self.meta:
            return storage.commit_time_ns(self.path, self.meta) / 1e9
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0


def check_step(
    step_dir: str | os.PathLike, verify: str = "size", require_dcp: bool = True
) -> tuple[dict | None, str]:
    """(metadata, "") when ``step_dir`` can be resumed, else (metadata or None, the reason)."""
    root = Path(step_dir)
    meta, prob = storage.read_metadata(root)
    if prob is not None:
        return None, str(prob)
    problems = storage.verify_step_dir(root, verify, meta, require_dcp)
    if problems:
        return meta, str(problems[0])
    world = meta.get("world_size") if meta else None
    if storage.is_original_layout(root):
        return meta, ""
    ts = root / storage.train_state_name(0)
    if not ts.is_file():
        return meta, f"{ts}: missing (the train state is written before the commit)"
    if isinstance(world, int) and world > 1:
        last = root / storage.train_state_name(world - 1)
        if not last.is_file():
            return meta, f"{last}: missing (saved with world size {world})"
    return meta, ""


def was_committed(step_dir: str | os.PathLike, latest_target: str | None = None) -> bool:
    """Whether ``step_dir`` was committed, so that a problem in it is corruption.

    Our saves become ``step_N`` only by a rename after everything is written, so a ``step_N``
    holding our metadata or train state was committed. The original KempnerForge wrote into
    ``step_N`` directly and moved ``latest`` once the save was durable: one of its steps that
    ``latest`` does not name may simply be a save that never finished.
    """
    root = Path(step_dir)
    if latest_target is not None and root.name == latest_target:
        return True
    if (root / storage.TRAIN_STATE_DIR).is_dir():
        return True
    meta, _ = storage.read_metadata(root)
    return bool(meta) and meta.get("format") == storage.FORMAT_NAME


def scan(
    root: str | os.PathLike, verify: str = "size", require_dcp: bool = True
) -> list[StepEntry]:
    """Every checkpoint-looking directory under ``root`` with its verdict, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    target, _ = storage.read_latest(root)
    entries = []
    for child in root.iterdir():
        if child.is_symlink() or not child.is_dir():
            continue
        step = storage.parse_step_dir(child.name)
        if step is not None:
            meta, problem = check_step(child, verify, require_dcp)
            committed = not problem or was_committed(child, target.name if target else None)
            if not committed:
                problem = f"interrupted save (never completed: {problem})"
            entries.append(StepEntry(child, step, committed, problem, meta or {}))
            continue
        step = storage.parse_tmp_step_dir(child.name)
        if step is not None:
            entries.append(StepEntry(child, step, False, "interrupted save (never committed)"))
    entries.sort(key=lambda e: (e.step, e.committed))
    return entries


def find_resumable(
    root: str | os.PathLike, verify: str = "size", require_dcp: bool = True
) -> Resolution:
    """The checkpoint a resume under ``root`` loads (``latest`` first). Never raises."""
    root = Path(root)
    res = Resolution()
    target, why = storage.read_latest(root)
    entries = [e for e in scan(root, verify, require_dcp) if e.committed]
    by_name = {e.path.name: e for e in entries}
    if target is not None:
        entry = by_name.get(target.name)
        if entry is None:  # latest names something that is not a step_N directory
            res.warnings.append(f"{root}/latest -> {target.name} is not a step directory")
        elif entry.usable:
            res.path, res.meta = str(entry.path), entry.meta
            return res
        else:
            res.warnings.append(f"{root}/latest -> {target.name} is not usable ({entry.problem})")
    elif entries and why:
        res.warnings.append(why)
    candidates = sorted(
        (e for e in entries if target is None or e.path.name != target.name),
        key=lambda e: (e.commit_time, e.step),
        reverse=True,
    )
    for e in candidates:
        if not e.usable:
            res.warnings.append(f"skipping {e.path} ({e.problem})")
            continue
        res.path, res.meta = str(e.path), e.meta
        if res.warnings:
            res.warnings.append(f"falling back to {e.path}")
        return res
    res.corrupt = {e.path.name: e.problem for e in entries if e.corrupt}
    if res.corrupt:
        listed = "; ".join(f"{name}: {why}" for name, why in sorted(res.corrupt.items()))
        res.error = (
            f"every checkpoint under {root} is unusable, so resuming would start over from "
            f"step 0: {listed}. The directories are kept for inspection (`kempnerforge ckpt "
            f"verify {root}`). Fix or remove them, or set checkpoint.on_all_corrupt=start_fresh "
            "to train from scratch beside them."
        )
    return res


def resolve_explicit(
    path: str | os.PathLike, verify: str = "size", require_dcp: bool = True
) -> Resolution:
    """A step dir (or a checkpoint root, or a ``latest`` link) the user named. Errors name it.

    A step in the original KempnerForge's layout whose ``metadata.json`` cannot be read still
    loads (with a warning): the original read that file only for its freeze check, and the step
    is in ``train_state.pt``.
    """
    p = Path(path)
    if not p.exists():
        return Resolution(
            error=f"checkpoint path {p} does not exist (check checkpoint.load_path or the path "
            "passed to load)"
        )
    if not p.is_dir():
        return Resolution(error=f"checkpoint path {p} is not a directory")
    if is_step_dir(p):
        p = p.resolve()
        meta, problem = check_step(p, verify, require_dcp)
        if meta is None and storage.is_original_layout(p) and storage.has_dcp_metadata(p):
            return Resolution(path=str(p), meta={}, warnings=[f"Could not read {problem}"])
        if problem:
            return Resolution(error=f"checkpoint {p} is not usable: {problem}", meta=meta)
        return Resolution(path=str(p), meta=meta)
    res = find_resumable(p, verify, require_dcp)
    if res.path is None and res.error is None:
        res.error = f"no complete checkpoint found under {p}" + (
            f" ({'; '.join(res.warnings)})" if res.warnings else ""
        )
    return res


def is_step_dir(path: str | os.PathLike) -> bool:
    """``path`` is one checkpoint (a step), not a directory of them."""
    p = Path(path)
    return (
        (p / storage.METADATA_FILE).exists()
        or storage.has_dcp_metadata(p)
        or storage.parse_step_dir(p.resolve().name) is not None
    )


def resume_step(root: str | os.PathLike, verify: str = "size") -> int | None:
    """The step a resume under ``root`` would start from, or None (nothing usable)."""
    return find_resumable(root, verify).step
