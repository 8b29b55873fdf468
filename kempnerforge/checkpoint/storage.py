"""The only module that touches the checkpoint filesystem.

Everything here is about making bytes *durable* and names *atomic* on a shared POSIX filesystem:
write to a temporary name, fsync the file, rename, fsync the directory. A reader that sees a name
(``step_N``, ``latest``, ``metadata.json``) therefore sees complete content behind it.

It also holds the manifest (relative path -> size + xxh3_64 checksum of every file of a step) and
its verification, the on-disk layout's names, and the test-only pause hook used by crash tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Layout names
# ---------------------------------------------------------------------------------------------
METADATA_FILE = "metadata.json"
DCP_METADATA_FILE = ".metadata"
TRAIN_STATE_DIR = "train_state"
ORIGINAL_TRAIN_STATE_FILE = "train_state.pt"  # the original KempnerForge: one file, rank 0's
LATEST = "latest"
TRASH_DIR = ".trash"
TMP_PREFIX = ".tmp_step_"
LOCK_FILE = ".lock"
LOCK_RECORD_FILE = ".lock.json"
GUARD_FILE = "requeue_guard.json"
FORMAT_NAME = "kempnerforge-checkpoint"
FORMAT_VERSION = 1
CHECKSUM_ALGO = "xxh3_64"

STEP_RE = re.compile(r"^step_(\d+)$")
TMP_STEP_RE = re.compile(r"^\.tmp_step_(\d+)(?:[-.].*)?$")
_PP_RE = re.compile(r"^pp_?(\d+)$")  # ours: pp_K; the original: ppK


class CheckpointFormatError(ValueError):
    """A checkpoint file is corrupt, incomplete or not what it claims to be."""


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: sizes in the lines people read."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def step_dir_name(step: int) -> str:
    return f"step_{int(step)}"


def tmp_step_dir_name(step: int, token: str) -> str:
    """Where a save of ``step`` is written before its commit renames it to ``step_N``."""
    return f"{TMP_PREFIX}{int(step)}-{token}"


def parse_step_dir(name: str) -> int | None:
    """``step_12`` -> 12; anything else (``step_abc``, ``.tmp_step_3``) -> None: not ours."""
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def parse_tmp_step_dir(name: str) -> int | None:
    """``.tmp_step_12-ab12cd34`` (a save in progress or interrupted) -> 12, else None."""
    m = TMP_STEP_RE.match(name)
    return int(m.group(1)) if m else None


def train_state_name(rank: int) -> str:
    return f"{TRAIN_STATE_DIR}/rank_{int(rank):05d}.pt"


def pp_dir_name(pp_rank: int) -> str:
    return f"pp_{int(pp_rank)}"


def dcp_dir(step_dir: str | os.PathLike, pp_rank: int | None = None) -> Path:
    """Where DCP's files of ``step_dir`` are: the step itself, or its pipeline stage's
    sub-directory (``pp_K``; checkpoints of the original KempnerForge use ``ppK``)."""
    root = Path(step_dir)
    if pp_rank is None:
        return root
    ours = root / pp_dir_name(pp_rank)
    original = root / f"pp{int(pp_rank)}"
    return original if not ours.exists() and original.exists() else ours


def has_dcp_metadata(step_dir: str | os.PathLike) -> bool:
    """DCP wrote its ``.metadata`` (last) into the step or into every pipeline stage's dir."""
    root = Path(step_dir)
    if (root / DCP_METADATA_FILE).exists():
        return True
    stages = [c for c in _children(root) if _PP_RE.match(c.name) and c.is_dir()]
    return bool(stages) and all((c / DCP_METADATA_FILE).exists() for c in stages)


def is_original_layout(step_dir: str | os.PathLike) -> bool:
    """A step written by the original KempnerForge: ``train_state.pt``, no ``train_state/``."""
    root = Path(step_dir)
    return (root / ORIGINAL_TRAIN_STATE_FILE).is_file() and not (root / TRAIN_STATE_DIR).is_dir()


def train_state_file(step_dir: str | os.PathLike, rank: int, saved_world_size: int) -> Path:
    """The train-state file rank ``rank`` resumes from (rank 0's when the world size changed;
    the single ``train_state.pt`` in the original's layout)."""
    root = Path(step_dir)
    if is_original_layout(root):
        return root / ORIGINAL_TRAIN_STATE_FILE
    return root / train_state_name(rank)


def _children(root: Path) -> list[Path]:
    try:
        return list(root.iterdir())
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# Test-only pause hook
# ---------------------------------------------------------------------------------------------
PAUSE_ENV = "KEMPNERFORGE_CKPT_TEST_PAUSE"
PAUSE_MARKER_ENV = "KEMPNERFORGE_CKPT_TEST_PAUSE_MARKER"


def test_pause(point: str, rank: int) -> None:
    """Sleep at a named point of the save protocol when a test asks for it.

    ``KEMPNERFORGE_CKPT_TEST_PAUSE="train_state_write=30@0,dcp_written=5"`` pauses rank 0 for 30 s
    inside its train-state write and every rank for 5 s after DCP wrote its shards. When
    ``KEMPNERFORGE_CKPT_TEST_PAUSE_MARKER`` names a directory, an empty file ``{point}.{rank}`` is
    created there when the pause begins, so a test can SIGKILL the process at exactly that point
    without guessing timings. Points: ``dcp_written`` (async flush: shards on disk, nothing
    committed), ``train_state_write`` (temp file written, not renamed), ``pre_commit`` (metadata
    written, step not renamed), ``latest_swap`` (new link made, not renamed over ``latest``),
    ``retention`` (before pruning). Unset in production: one dict lookup per point.
    """
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, rest = item.strip().partition("=")
        if name != point or not rest:
            continue
        secs, _, who = rest.partition("@")
        if who and int(who) != rank:
            continue
        marker_dir = os.environ.get(PAUSE_MARKER_ENV)
        if marker_dir:
            Path(marker_dir, f"{point}.{rank}").touch()
        time.sleep(float(secs))


# ---------------------------------------------------------------------------------------------
# Durability primitives
# ---------------------------------------------------------------------------------------------
def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so the names created/renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some network filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: str | os.PathLike, mode: int) -> Path:
    """Create ``path`` (and parents) with ``mode`` regardless of the umask; existing dirs are kept."""
    p = Path(path)
    missing = []
    q = p
    while not q.exists():
        missing.append(q)
        q = q.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
            os.chmod(d, mode)  # mkdir's mode is filtered by the umask
        except FileExistsError:
            pass
    return p


def atomic_write_bytes(
    path: str | os.PathLike,
    data: bytes,
    *,
    pause_point: str | None = None,
    rank: int = 0,
    mode: int = 0o600,
) -> None:
    """Write ``data`` to ``path`` so a reader sees either the old file or the complete new one.

    The one atomic writer of the project's files: checkpoints' own files, the job lock's record
    and the requeue guard's record (temp name, fsync, rename, fsync of the directory).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    if pause_point:
        test_pause(pause_point, rank)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any, **kw: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), **kw)


def atomic_symlink(target: str, link: str | os.PathLike, *, rank: int = 0) -> None:
    """Point ``link`` at ``target`` (relative) atomically: symlink to a temp name, rename over."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.symlink(target, tmp)
    test_pause("latest_swap", rank)
    os.replace(tmp, link)
    fsync_dir(link.parent)


_RENAME_EXCHANGE = 2
_libc: Any = None


def _renameat2_exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def commit_dir(tmp: str | os.PathLike, final: str | os.PathLike, trash: str | os.PathLike) -> None:
    """Rename the finished temp dir ``tmp`` to ``final``; never tears an existing ``final``.

    If ``final`` already exists (the same step saved twice), the two are swapped atomically with
    ``renameat2(RENAME_EXCHANGE)`` and the old copy goes to ``trash``. Where the filesystem cannot
    exchange, the old copy is renamed aside first: a crash in that window leaves no ``step_N``
    (resume falls back to the previous complete step), never a half-written one.
    """
    tmp, final = str(tmp), str(final)
    parent = os.path.dirname(final)
    if os.path.lexists(final):
        aside = os.path.join(str(trash), f"{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
        make_dir(trash, 0o700)
        if _renameat2_exchange(tmp, final):
            os.rename(tmp, aside)
        else:
            logger.warning(
                "filesystem cannot swap directories atomically; replacing %s in two renames", final
            )
            os.rename(final, aside)
            fsync_dir(parent)
            os.rename(tmp, final)
    else:
        os.rename(tmp, final)
    fsync_dir(parent)


def move_to_trash(path: str | os.PathLike, trash: str | os.PathLike) -> Path:
    """Make ``path`` disappear from its name at once (rename); delete it later off the hot path."""
    make_dir(trash, 0o700)
    dest = Path(trash) / f"{Path(path).name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, dest)
    return dest


def empty_trash(trash: str | os.PathLike) -> None:
    p = Path(trash)
    if not p.is_dir():
        return
    for child in p.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------
def checksum_file(path: str | os.PathLike, chunk: int = 8 << 20) -> tuple[int, str]:
    """(size, xxh3_64 hex) of a file, read in chunks (fast: page cache + ~10 GB/s hashing)."""
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        mv = memoryview(buf)
        while True:
            n = f.readinto(mv)
            if not n:
                break
            h.update(mv[:n])
            size += n
    return size, h.hexdigest()


def manifest_entries(
    root: str | os.PathLike,
    rel_paths: Iterable[str],
    known: dict[str, tuple[int, str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Manifest entries of ``rel_paths`` under ``root``.

    ``known`` maps a path (relative to ``root``) to the (size, xxh3_64) computed while the file
    was written (:class:`HashingFileSystem`); it is used when the size on disk still matches, so
    the file is not read a second time. Anything else is read and hashed.
    """
    out: dict[str, dict[str, Any]] = {}
    known = known or {}
    for rel in rel_paths:
        path = Path(root) / rel
        hit = known.get(rel)
        if hit is not None and path.stat().st_size == hit[0]:
            size, digest = hit
        else:
            size, digest = checksum_file(path)
        out[rel] = {"size": size, CHECKSUM_ALGO: digest}
    return out


def byte_view(b: Any) -> memoryview:
    """A flat byte view of any buffer a stream is handed (bytes, memoryview, numpy array)."""
    mv = memoryview(b)
    return mv if mv.ndim == 1 and mv.itemsize == 1 else mv.cast("B")


class _HashingStream(io.RawIOBase):
    """A write-only stream that hashes every byte on its way to the file.

    DCP writes each shard file front to back (``write``, ``tell``, ``flush``, ``fileno`` for its
    fsync, ``close``). A ``seek`` or a short write makes the running hash unusable; the stream then
    reports nothing and the manifest falls back to reading the file.
    """

    def __init__(self, raw: Any, key: str, sink: dict[str, tuple[int, str]]) -> None:
        super().__init__()
        self._raw = raw
        self._key = key
        self._sink = sink
        self._h = xxhash.xxh3_64()
        self._n = 0
        self._ok = True

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = byte_view(b)
        n = self._raw.write(mv)
        n = len(mv) if n is None else n
        if n != len(mv):
            self._ok = False
        self._h.update(mv[:n])
        self._n += n
        return n

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, *args: Any) -> int:
        self._ok = False
        return self._raw.seek(*args)

    def truncate(self, *args: Any) -> int:
        self._ok = False
        return self._raw.truncate(*args)

    def flush(self) -> None:
        if not self._raw.closed:
            self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._ok and self._raw.tell() == self._n:
                self._sink[self._key] = (self._n, self._h.hexdigest())
            self._raw.close()
        finally:
            super().close()


def hashing_filesystem(sink: dict[str, tuple[int, str]]) -> Any | None:
    """A DCP ``FileSystem`` whose write streams record (size, xxh3_64) of each file in ``sink``.

    Keys are file names (DCP writes one flat directory per checkpoint id). Returns None when this
    torch's ``FileSystem`` has no ``create_stream`` to wrap; the caller then keeps the default
    one and the manifest reads the files back.
    """
    try:
        from torch.distributed.checkpoint.filesystem import FileSystem
    except ImportError:  # pragma: no cover
        return None
    if not callable(getattr(FileSystem, "create_stream", None)):  # pragma: no cover
        return None

    class _HashingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path: str | os.PathLike, mode: str) -> Any:
            if "w" not in mode or "+" in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with super().create_stream(path, mode) as raw:
                stream = _HashingStream(raw, Path(path).name, sink)
                try:
                    yield stream
                finally:
                    stream.close()

        def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
            super().rename(path, new_path)  # DCP writes .metadata.tmp, then renames it
            hit = sink.pop(Path(path).name, None)
            if hit is not None:
                sink[Path(new_path).name] = hit

    return _HashingFileSystem()


def list_files(root: str | os.PathLike) -> list[str]:
    """Every regular file under ``root`` as a relative POSIX path, temp files of ours excluded."""
    root = Path(root)
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if ".tmp-" in f and f.startswith("."):
                continue
            out.append((Path(dirpath) / f).relative_to(root).as_posix())
    return sorted(out)


@dataclass
class Problem:
    """Why a step directory cannot be trusted; ``file`` names the culprit for the user."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def read_metadata(step_dir: str | os.PathLike) -> tuple[dict[str, Any] | None, Problem | None]:
    """metadata.json of a step dir, or the problem that prevents reading it. Never raises.

    The one reader of ``metadata.json``: the manager, the resolver, the CLI and the launcher's
    status all go through it (or :func:`load_metadata`, which raises).
    """
    p = Path(step_dir) / METADATA_FILE
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None, Problem(str(p), "missing; it is written last, so this step was not committed")
    except OSError as e:
        return None, Problem(str(p), f"unreadable ({e.strerror or e})")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return None, Problem(str(p), f"corrupt JSON ({e})")
    if not isinstance(meta, dict):
        return None, Problem(str(p), f"expected a JSON object, got {type(meta).__name__}")
    if "step" not in meta:
        return None, Problem(str(p), "missing key 'step'")
    step = meta["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None, Problem(str(p), f"'step' must be an integer >= 0, got {step!r}")
    return meta, None


def load_metadata(step_dir: str | os.PathLike) -> dict[str, Any]:
    """:func:`read_metadata`, raising :class:`CheckpointFormatError` that names the file."""
    path = Path(step_dir)
    meta, problem = read_metadata(path.parent if path.name == METADATA_FILE else path)
    if problem is not None:
        raise CheckpointFormatError(
            f"{problem}. Resume from another checkpoint (auto-resume skips a broken one by "
            "itself), or repair the file if you know its step."
        )
    assert meta is not None
    return meta


def verify_step_dir(
    step_dir: str | os.PathLike,
    level: str = "size",
    meta: dict[str, Any] | None = None,
    require_dcp: bool = True,
) -> list[Problem]:
    """Check a step dir is complete: metadata.json readable, DCP ``.metadata`` present, and the
    manifest's files present with their sizes (``level="size"``) and checksums (``"full"``).

    ``level="none"`` checks only metadata.json and ``.metadata`` (``require_dcp=False``: a load
    that excludes both model and optimizer needs no DCP files). Checkpoints without a manifest
    (written by another tool) pass on the first two checks. Returns [] when the dir is good.
    """
    root = Path(step_dir)
    if meta is None:
        meta, prob = read_metadata(root)
        if prob is not None:
            return [prob]
    manifest = (meta or {}).get("manifest") or {}
    files: dict[str, Any] = manifest.get("files") or {}
    if require_dcp and not has_dcp_metadata(root):
        return [Problem(str(root / DCP_METADATA_FILE), "missing (DCP save did not finish)")]
    if level == "none":
        return []
    problems: list[Problem] = []
    for rel, entry in sorted(files.items()):
        f = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            problems.append(Problem(rel, "manifest path escapes the step directory"))
            continue
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            problems.append(Problem(str(f), "missing"))
            continue
        if size != entry.get("size"):
            problems.append(
                Problem(str(f), f"size {size} != {entry.get('size')} in the manifest (truncated?)")
            )
            continue
        if level == "full":
            _, digest = checksum_file(f)
            if digest != entry.get(CHECKSUM_ALGO):
                problems.append(Problem(str(f), f"{CHECKSUM_ALGO} checksum mismatch (corrupted)"))
    return problems


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------
def list_step_dirs(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_<int>`` directory under ``root``, ascending by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        step = parse_step_dir(child.name)
        if step is not None and child.is_dir() and not child.is_symlink():
            out.append((step, child))
    return sorted(out)


def read_latest(root: str | os.PathLike) -> tuple[Path | None, str | None]:
    """Where ``{root}/latest`` points: a relative link to a direct child of ``root`` (what we
    write), or a small file naming one (what a copy that does not keep links leaves).

    The one reader of ``latest``. Returns (path, None) or (None, why-not); a name leaving
    ``root`` is refused.
    """
    link = Path(root) / LATEST
    if link.is_symlink():
        target = os.readlink(link)
    elif link.is_file():
        try:
            raw = link.read_bytes()[:4096]
            target = raw.decode().strip()
        except (OSError, UnicodeDecodeError) as e:
            return None, f"{link} is not a link and not readable as a step name ({e})"
        if not target or "\n" in target:
            return None, f"{link} is a file that does not name a step directory"
    elif link.exists():
        return None, f"{link} is neither a link nor a file naming a step"
    else:
        return None, f"{link} does not exist"
    if os.path.isabs(target) or "/" in target.strip("/") or target in ("", ".", ".."):
        return None, f"{link} -> {target!r} points outside {root}; refused"
    p = Path(root) / target.strip("/")
    if not p.is_dir():
        return None, f"{link} -> {target} is dangling"
    return p, None


def commit_time_ns(step_dir: Path, meta: dict[str, Any]) -> int:
    t = meta.get("saved_at_ns")
    if isinstance(t, int):
        return t
    try:
        return (step_dir / METADATA_FILE).stat().st_mtime_ns
    except OSError:
        return 0
