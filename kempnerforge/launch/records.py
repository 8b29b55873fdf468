"""What the launcher leaves behind for ``--status``: a job record, and one exit record per rank
and run.

The job record (``<job>_kempnerforge.json``) says where a job's checkpoints and logs are. An exit
record (``<job>_<restart>_<rank>_exit.json``) says how one rank's command ended in one run: the
exit code or signal, the last lines of its log, the exception if the log ends in a Python
traceback, and what the launcher decided. A crash on a cluster is then explained by one command,
without reading every rank's log.

Log lines the training side writes for the launcher: exactly one ``kempnerforge stop: ...`` or
``kempnerforge hang: ...`` line when a run stops on purpose; ``--status`` shows the last one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kempnerforge import exit_codes
from kempnerforge.launch.signal_relay import signal_name

JOB_RECORD_SUFFIX = "_kempnerforge.json"
TAIL_LINES = 20
STOP_PREFIXES = ("kempnerforge stop:", "kempnerforge hang:")
LOG_PREFIX = "[kempnerforge.launch]"  # the launcher's own lines in a task's log
BANNER_PREFIX = f"{LOG_PREFIX} job "

_EXIT_RE = re.compile(r"^(?P<job>.+)_(?P<restart>\d+)_(?P<rank>\d+)_exit\.json$")
_TRACEBACK = "Traceback (most recent call last):"
# torch.distributed prefixes every line of an uncaught exception in a rank with ``[rankN]: ``.
_RANK_TAG = re.compile(r"^\[rank\d+\]: ?")


def job_record_path(folder: str | os.PathLike[str], job_id: str) -> Path:
    return Path(folder) / f"{job_id}{JOB_RECORD_SUFFIX}"


def exit_record_path(folder: str | os.PathLike[str], job_id: str, restart: int, rank: int) -> Path:
    return Path(folder) / f"{job_id}_{restart}_{rank}_exit.json"


def log_path(folder: str | os.PathLike[str], job_id: str, rank: int) -> Path:
    """The log of one rank, named as submitit names it (``%j_%t_log.out``)."""
    return Path(folder) / f"{job_id}_{rank}_log.out"


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """tmp + fsync + rename: a reader never sees half a record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def tail(path: str | os.PathLike[str], n: int, max_bytes: int = 256 << 10) -> list[str]:
    """The last ``n`` lines of a file (reads at most its last ``max_bytes``)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode(errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first one is cut
    return lines[-n:] if n else lines


_BANNER_RANK = re.compile(r" restart \d+ rank \d+/\d+")


def last_run(lines: Sequence[str], job_id: str | None = None) -> list[str]:
    """The lines after the last run banner (every run of a rank starts with one)."""
    prefix = BANNER_PREFIX + (f"{job_id} " if job_id else "")
    for i in range(len(lines) - 1, -1, -1):
        # the banner names the rank as r/W; the wrapper's closing line ("rank r: command
        # ended ...") belongs to the run it closes
        if lines[i].startswith(prefix) and _BANNER_RANK.search(lines[i]):
            return list(lines[i + 1 :])
    return list(lines)


def _untag(line: str) -> tuple[str, str]:
    """``"[rank1]: ValueError: x"`` -> ``("[rank1]", "ValueError: x")``; untagged: ("", line)."""
    m = _RANK_TAG.match(line)
    return (m.group(0).rstrip(" :"), line[m.end() :]) if m else ("", line)


def exception_line(lines: Sequence[str]) -> str | None:
    """The exception of the last Python traceback in ``lines`` (``ValueError: boom``), if any.

    A traceback whose lines carry a ``[rankN]: `` tag (torch.distributed's form) is read through
    the tag, and only lines with the same tag belong to it: ranks writing to one log interleave.
    """
    start, tag = None, ""
    for i in range(len(lines) - 1, -1, -1):
        tag, body = _untag(lines[i])
        if body.strip() == _TRACEBACK:
            start = i
            break
    if start is None:
        return None
    for line in lines[start + 1 :]:
        line_tag, body = _untag(line)
        if line_tag != tag:
            continue
        if body and not body[0].isspace() and not body.startswith(LOG_PREFIX):
            return body.strip()
    return None


def stop_line(lines: Iterable[str]) -> str | None:
    """The last ``kempnerforge stop: ...`` / ``kempnerforge hang: ...`` line (any log prefix)."""
    found = None
    for line in lines:
        for prefix in STOP_PREFIXES:
            i = line.find(prefix)
            if i >= 0:
                found = line[i:].strip()
    return found


def code_text(returncode: int) -> str:
    """``exit 1`` or ``killed by SIGKILL`` (a Popen return code)."""
    return f"killed by {signal_name(-returncode)}" if returncode < 0 else f"exit {returncode}"


def describe_exit(returncode: int) -> str:
    """``exit 75 (saved, wants another run)``, ``killed by SIGKILL``, ``exit 1 (crash)``."""
    if returncode < 0:
        return code_text(returncode)
    meaning = {
        exit_codes.OK: "done",
        exit_codes.RESTART: "saved, wants another run",
        exit_codes.REFUSED: "the requeue guard refused another run",
        exit_codes.HANG: "hang detected, another run allowed",
    }.get(returncode, "crash")
    return f"exit {returncode} ({meaning})"


def is_crash(returncode: int) -> bool:
    return returncode != exit_codes.OK and returncode not in (
        exit_codes.RESTARTABLE | {exit_codes.REFUSED}
    )


def shell_code(returncode: int) -> int:
    """A Popen return code as a shell reports it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def exit_record(
    job_id: str,
    restart: int,
    rank: int,
    returncode: int,
    log_lines: Sequence[str],
    **extra: Any,
) -> dict[str, Any]:
    """One rank's exit in one run; ``log_lines``: the end of that rank's log for this run."""
    rec: dict[str, Any] = {
        "job_id": job_id,
        "restart": restart,
        "rank": rank,
        "time": round(time.time(), 3),
        "outcome": describe_exit(returncode),
        "crash": is_crash(returncode),
        "log_tail": list(log_lines[-TAIL_LINES:]),
        "exception": exception_line(log_lines),
    }
    if returncode < 0:
        rec["signal"] = signal_name(-returncode)
    else:
        rec["exit_code"] = returncode
    rec.update(extra)
    return rec


def read_exit_records(folder: str | os.PathLike[str], job_id: str) -> list[dict[str, Any]]:
    """Every exit record of ``job_id`` in ``folder``, by (restart, time)."""
    out = []
    with contextlib.suppress(OSError):
        for p in Path(folder).glob(f"{glob_escape(job_id)}_*_*_exit.json"):
            m = _EXIT_RE.match(p.name)
            if m and m.group("job") == job_id:
                rec = read_json(p)
                if rec is not None:
                    out.append(rec)
    return sorted(out, key=lambda r: (int(r.get("restart", 0)), float(r.get("time", 0))))


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)
