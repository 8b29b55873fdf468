"""Checks that turn hostile or mismatched checkpoints into clear errors before any state moves.

* :func:`check_compatible`: compares what this run is about to load (keys, global shapes) with
  DCP's metadata of the checkpoint, read through the restricted unpickler, and names every key
  that is missing, unexpected or of another shape. DCP's own message for the same situation is
  one key deep inside a ``CheckpointException``; ours lists them all and says what to do.
* :func:`check_dir_safety`: a checkpoint directory another user owns, or one that anyone may
  write into, is a place where someone else can plant or swap files under our ``latest``.
  Saving there is refused; loading from there is allowed (every load path is pickle-free) with
  a warning.
* :func:`explain_dcp_failure`: DCP wraps errors of every rank in ``CheckpointException`` (a
  ``BaseException``); this pulls out the first real cause so users see it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from kempnerforge.checkpoint.safe_unpickle import CheckpointFormatError, load_dcp_metadata

logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError, RuntimeError, CheckpointException):
    """The checkpoint was saved from another model/optimizer than the one loading it.

    Raised before DCP runs, with every mismatch listed. It is also a ``RuntimeError`` and a DCP
    ``CheckpointException``, what DCP itself raised for the same situation in the original
    KempnerForge, so code that caught those keeps working.
    """

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self._failures: dict = {}

    __str__ = BaseException.__str__


class UnsafeCheckpointDirError(PermissionError):
    """The checkpoint directory can be written by others (or belongs to someone else)."""


def _global_shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):  # DTensor.size() is the global (unsharded) shape
        return tuple(value.size())
    return None


def check_compatible(
    dcp_dir: str | os.PathLike,
    state_dict: dict[str, Any],
    metadata: Metadata | None = None,
    limit: int = 20,
) -> Metadata:
    """Raise :class:`CheckpointMismatchError` when ``state_dict`` cannot load from ``dcp_dir``.

    Checks, per flattened key: present in the checkpoint, a tensor where a tensor is expected,
    same global shape. Under ``model.``, keys the checkpoint has and this model lacks are
    errors too (loading would silently drop those weights). Returns the (safely read) metadata.
    """
    md = metadata if metadata is not None else load_dcp_metadata(dcp_dir)
    flat, _ = flatten_state_dict(state_dict)
    saved = md.state_dict_metadata
    missing, shapes, kinds = [], [], []
    for key, value in flat.items():
        entry = saved.get(key)
        if entry is None:
            missing.append(key)
            continue
        want = _global_shape(value)
        if want is None:
            continue  # a non-tensor value (hyper-parameter): DCP stores it as bytes
        if not isinstance(entry, TensorStorageMetadata):
            kinds.append(f"{key} (checkpoint holds a non-tensor value)")
        elif tuple(entry.size) != want:
            shapes.append(f"{key}: checkpoint {tuple(entry.size)}, this model {want}")
    tops = {k.split(".", 1)[0] for k in state_dict}
    unexpected = sorted(
        k for k in saved if k not in flat and "model" in tops and k.startswith("model.")
    )
    if not (missing or shapes or kinds or unexpected):
        return md
    parts = []
    for title, items in (
        ("keys missing from the checkpoint", missing),
        ("shape mismatches", shapes),
        ("type mismatches", kinds),
        ("checkpoint keys this model does not have", unexpected),
    ):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{title} ({len(items)}): " + "; ".join(items[:limit]) + more)
    raise CheckpointMismatchError(
        f"checkpoint {dcp_dir} does not match the model/optimizer being loaded; it was saved "
        f"from another model or configuration. " + " | ".join(parts) + ". Load it with the "
        "config it was saved with, or pass exclude_keys=['optimizer'] when only the optimizer "
        "changed."
    )


def check_dir_safety(path: str | os.PathLike, *, for_write: bool, dir_mode: int = 0o700) -> None:
    """Refuse (writing) or warn about (reading) a checkpoint directory others control.

    Refused for writing: owned by another user, or writable by everyone (``o+w``) unless
    ``dir_mode`` itself asked for that. Group-writable: a warning (shared project directories
    are common), unless ``dir_mode`` asked for it. For reading everything is a warning: loads
    are pickle-free, so the risk is wrong data, not code execution.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return
    problems: list[tuple[str, bool]] = []  # (message, refuse when writing)
    uid = os.getuid()
    if st.st_uid != uid:
        problems.append(
            (f"is owned by uid {st.st_uid} ({_user(st.st_uid)}), not by you (uid {uid})", True)
        )
    if st.st_mode & stat.S_IWOTH and not dir_mode & stat.S_IWOTH:
        problems.append((f"is writable by every user (mode {stat.filemode(st.st_mode)})", True))
    elif st.st_mode & stat.S_IWGRP and not dir_mode & stat.S_IWGRP:
        problems.append((f"is group-writable (mode {stat.filemode(st.st_mode)})", False))
    for msg, refuse in problems:
        text = (
            f"checkpoint directory {p} {msg}: others could plant or replace files that "
            "this job resumes from"
        )
        if for_write and refuse:
            raise UnsafeCheckpointDirError(
                f"{text}. Refusing to save there: use a directory you own and that only you can "
                f"write (e.g. chmod o-w,g-w {p}), or set checkpoint.dir_mode to allow it."
            )
        logger.warning("%s", text)


def _user(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return "unknown user"


def explain_dcp_failure(exc: BaseException, path: str | os.PathLike) -> BaseException:
    """The most useful exception inside DCP's ``CheckpointException`` (or ``exc`` itself)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        causes = [c[0] if isinstance(c, tuple) and c else c for c in failures.values()]
        for inner in causes:
            if isinstance(inner, CheckpointFormatError):
                return inner
        return CheckpointFormatError(f"loading {path} failed: {causes[0]!r}")
    if isinstance(exc, CheckpointFormatError):
        return exc
    text = str(exc)
    if "refused" in text and ".metadata" in text:
        return CheckpointFormatError(text)
    return exc


def diagnose_write_failure(path: str | os.PathLike, needed_bytes: int = 0) -> str:
    """A sentence on why writes under ``path`` may fail: free space, quota-like limits.

    DCP's writer reports a full disk as whatever its zip writer noticed first (e.g. "unexpected
    pos 704 vs 598"); this adds the facts a user needs to act on it.
    """
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    facts = []
    try:
        vfs = os.statvfs(p)
        free = vfs.f_bavail * vfs.f_frsize
        facts.append(f"{_mib(free)} free on the filesystem of {p}")
        if needed_bytes and free < needed_bytes:
            facts.append(f"the checkpoint needs about {_mib(needed_bytes)}")
        if vfs.f_favail == 0 and vfs.f_files:
            facts.append("no free inodes")
    except OSError as e:
        facts.append(f"statvfs({p}) failed: {e.strerror or e}")
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            facts.append(
                f"this process may not write files larger than {_mib(soft)} (RLIMIT_FSIZE)"
            )
    except (ImportError, OSError, ValueError):
        pass
    return "; ".join(facts)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def describe_failure(exc: BaseException) -> str:
    """``repr`` of the real cause(s) of a failure, without DCP's per-rank traceback dumps."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        causes: dict[str, list[int]] = {}
        for rank, cause in failures.items():
            inner = cause[0] if isinstance(cause, tuple) and cause else cause
            causes.setdefault(repr(inner), []).append(rank)
        return "; ".join(
            f"{text} (rank {', '.join(map(str, ranks))})" for text, ranks in causes.items()
        )
    return repr(exc)
