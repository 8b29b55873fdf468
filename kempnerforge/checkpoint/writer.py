"""A DCP storage writer for staged host buffers: same files as DCP's, written closer to the disk floor.

The files are what ``FileSystemWriter`` produces and ``FileSystemReader`` / ``dcp.load`` read:
``__{rank}_{i}.distcp`` with one ``torch.save`` record per tensor and the pickled ``.metadata``.
Only the way bytes reach the disk differs:

- each writer thread owns one file and writes it through a raw file descriptor: tensor data in
  16 MiB pieces, each hashed (xxh3_64, for the manifest) right before it is written, while it is
  in the CPU cache, so the manifest costs no second pass over memory and no re-read; the small
  records around the data are gathered into one write;
- ``torch.save`` runs without its zip CRC32: the manifest's checksums already cover every byte
  (``torch.load`` does not need the CRC). ``torch.serialization``'s CRC switch is process-wide,
  so it is off only while a save writes and is restored afterwards;
- without the CRC, the bytes ``torch.save`` writes around a tensor's data depend only on the
  tensor's kind (dtype, shape, stride), so they are learned once per kind and reused
  (:class:`_TorchSaveTemplates`): later saves write the same files without a pickler per tensor
  holding the interpreter lock the training loop needs;
- records are assigned to files largest first onto the least-loaded file, so the threads finish
  together.

Anything this torch does not provide (private DCP names move between releases) makes
:func:`make_writer` fall back to DCP's own ``FileSystemWriter``: slower, same format.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.futures import Future

from kempnerforge.checkpoint.storage import byte_view

logger = logging.getLogger(__name__)

try:  # private names of DCP's filesystem backend; missing -> fall back to FileSystemWriter
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult

    _AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the torch release
    _AVAILABLE = False

_PIECE = 16 << 20  # bytes per write() of tensor data
_SMALL = 1 << 20  # writes below this are gathered into one write()


class _HashedFd(io.RawIOBase):
    """Write-only stream over a file descriptor that hashes (xxh3_64) every byte it writes.

    ``torch.save`` emits a dozen small records around each tensor's data; those are gathered in a
    small buffer so a file of many small tensors costs a few system calls, not one per record.
    """

    def __init__(self, fd: int, path: Path) -> None:
        super().__init__()
        self.fd = fd
        self.path = path
        self.n = 0
        self.h = xxhash.xxh3_64()
        self._buf = bytearray()
        self.error: OSError | None = None  # torch.save's zip writer may swallow it: kept here

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = byte_view(b)
        total = len(mv)
        if total < _SMALL:
            self.h.update(mv)
            self._buf += mv
            if len(self._buf) >= _SMALL:
                self._drain()
        else:
            self._drain()
            for off in range(0, total, _PIECE):
                piece = mv[off : off + _PIECE]
                self.h.update(piece)  # while it is in the CPU cache, just before the kernel copy
                self._write_all(piece)
        self.n += total
        return total

    def _drain(self) -> None:
        if self._buf:
            self._write_all(memoryview(self._buf))
            self._buf = bytearray()

    def _write_all(self, piece: memoryview) -> None:
        while piece:
            try:
                piece = piece[os.write(self.fd, piece) :]
            except OSError as e:  # e.g. ENOSPC: name the file
                self.error = OSError(e.errno, e.strerror, str(self.path))
                raise self.error from e

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        self._drain()

    def fileno(self) -> int:
        return self.fd


_crc_lock = threading.Lock()
_crc_users = 0
_crc_saved = True


@contextlib.contextmanager
def _zip_crc32_off() -> Iterator[None]:
    """Skip ``torch.save``'s per-record CRC32 while at least one save writes (refcounted)."""
    global _crc_users, _crc_saved
    get = getattr(torch.serialization, "get_crc32_options", None)
    set_ = getattr(torch.serialization, "set_crc32_options", None)
    if get is None or set_ is None:  # pragma: no cover - older torch
        yield
        return
    with _crc_lock:
        if _crc_users == 0:
            _crc_saved = get()
            set_(False)
        _crc_users += 1
    try:
        yield
    finally:
        with _crc_lock:
            _crc_users -= 1
            if _crc_users == 0:
                set_(_crc_saved)


def _settings_key() -> tuple:
    """What besides the tensor shapes torch.save's framing bytes: its process-wide settings."""
    try:
        from torch.utils.serialization import config

        return tuple(sorted((k, repr(v)) for k, v in vars(config.save).items() if k[0] != "_"))
    except Exception:  # pragma: no cover - older torch: the CRC switch is all there is
        get = getattr(torch.serialization, "get_crc32_options", None)
        return (("crc32", get() if get else None),)


class _Capture:
    """Forwards torch.save's writes to ``out`` and keeps every byte except the tensor's data."""

    def __init__(self, out: _HashedFd, data_ptr: int, nbytes: int) -> None:
        self.out, self.data_ptr, self.nbytes = out, data_ptr, nbytes
        self.before: list[bytes] = []
        self.after: list[bytes] = []
        self.data_writes = 0

    def write(self, b: Any) -> int:
        mv = byte_view(b)
        if len(mv) == self.nbytes and _address(mv) == self.data_ptr:
            self.data_writes += 1
        else:
            (self.after if self.data_writes else self.before).append(bytes(mv))
        return self.out.write(mv)

    def tell(self) -> int:
        return self.out.tell()

    def flush(self) -> None:
        self.out.flush()


def _address(mv: memoryview) -> int:
    import numpy as np

    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data) if len(mv) else -1


class _TorchSaveTemplates:
    """torch.save's bytes around a tensor's data, learned from one real torch.save per kind.

    With the zip CRC off, ``torch.save`` of a contiguous tensor writes the same bytes before and
    after the data for every tensor of the same dtype, shape and stride: the pickle, the zip
    headers and the central directory describe the tensor, not its values. Every save writes
    hundreds of tensors again, and a real ``torch.save`` (a pickler, a zip writer, a dozen records)
    holds the interpreter lock that the training loop needs; after the first save a tensor costs
    three writes. A kind whose data write cannot be told apart keeps using ``torch.save``.
    """

    def __init__(self) -> None:
        self._known: dict[tuple, tuple[bytes, bytes] | None] = {}

    def write(self, t: torch.Tensor, stream: _HashedFd, settings: tuple) -> None:
        """Write ``t`` as ``torch.save`` would; ``settings`` is ``_settings_key()`` of this save."""
        nbytes = t.numel() * t.element_size()
        plain = (
            nbytes > 0
            and type(t) is torch.Tensor
            and t.layout == torch.strided
            and not t.is_quantized
            and t.is_contiguous()
            and t.storage_offset() == 0
        )
        if not plain:
            torch.save(t, stream)
            return
        key = (t.dtype, tuple(t.shape), tuple(t.stride()), t.requires_grad, settings)
        if key in self._known:
            tpl = self._known[key]
            if tpl is None:
                torch.save(t, stream)
                return
            stream.write(tpl[0])
            stream.write(t.reshape(-1).view(torch.uint8).numpy())
            stream.write(tpl[1])
            return
        cap = _Capture(stream, t.data_ptr(), nbytes)
        torch.save(t, cap)
        self._known[key] = (
            (b"".join(cap.before), b"".join(cap.after)) if cap.data_writes == 1 else None
        )


_TEMPLATES = _TorchSaveTemplates()  # process-wide: every save of a job writes the same kinds


def _item_bytes(item: Any) -> int:
    td = getattr(item, "tensor_data", None)
    if td is None:
        return 0
    n = 1
    for s in td.size:
        n *= s
    return n * td.properties.dtype.itemsize


def assign_files(items: list[Any], files: int) -> list[list[Any]]:
    """Split write items over at most ``files`` files of about equal bytes: largest item first,
    each onto the least-loaded file (byte items and empty tensors weigh one byte). Empty files
    are dropped."""
    files = max(1, files)
    out: list[list[Any]] = [[] for _ in range(files)]
    loads = [0] * files
    weighed = sorted(((max(1, _item_bytes(it)), k, it) for k, it in enumerate(items)), reverse=True)
    for w, _, it in weighed:
        i = loads.index(min(loads))
        out[i].append(it)
        loads[i] += w
    return [b for b in out if b]


class StagedFileWriter(FileSystemWriter):
    """``FileSystemWriter`` whose ``write_data`` writes each file in its own thread, hashing
    while writing. ``digests`` receives ``name -> (size, xxh3_64 hex)`` of every file written
    (``.metadata`` included, through ``fs`` when the caller installs a hashing filesystem)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        thread_count: int,
        digests: dict[str, tuple[int, str]] | None = None,
        sync_files: bool = True,
    ) -> None:
        super().__init__(path, thread_count=thread_count, sync_files=sync_files)
        self.digests = digests if digests is not None else {}

    def write_data(self, plan: Any, planner: Any) -> Future:
        prefix = plan.storage_data.prefix
        groups = assign_files(list(plan.items), self.thread_count)
        names = [f"{prefix}{i}{DEFAULT_SUFFIX}" for i in range(len(groups))]
        fut: Future = Future()
        try:
            with _zip_crc32_off():
                settings = _settings_key()  # fixed for the whole save: read once, not per tensor
                jobs = [(n, g, planner, settings) for n, g in zip(names, groups, strict=True)]
                if len(jobs) <= 1:
                    results = [self._write_file(*job) for job in jobs]
                else:
                    with ThreadPoolExecutor(
                        len(jobs), thread_name_prefix="kempnerforge-write"
                    ) as pool:
                        results = list(pool.map(lambda job: self._write_file(*job), jobs))
        except BaseException as e:
            fut.set_exception(e)
            return fut
        fut.set_result([r for rs in results for r in rs])
        return fut

    def _write_file(self, name: str, items: list[Any], planner: Any, settings: tuple) -> list[Any]:
        path = Path(self.path) / name
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600
        )
        results = []
        stream = _HashedFd(fd, path)
        try:
            for item in items:
                offset = stream.n
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                else:
                    t = data.detach()
                    if t.device.type != "cpu":
                        t = t.cpu()
                    if not t.is_contiguous() or (
                        t.untyped_storage().nbytes() != t.numel() * t.element_size()
                    ):
                        t = t.clone(memory_format=torch.contiguous_format)  # save only its bytes
                    _TEMPLATES.write(t, stream, settings)
                length = stream.n - offset
                results.append(
                    WriteResult(
                        index=item.index,
                        size_in_bytes=length,
                        storage_data=_StorageInfo(name, offset, length),
                    )
                )
            stream.flush()
            if self.sync_files:
                os.fsync(fd)
        except Exception as e:
            if stream.error is not None and e is not stream.error:
                raise stream.error from e  # the write's own error, not the zip writer's symptom
            raise
        finally:
            os.close(fd)
        self.digests[name] = (stream.n, stream.h.hexdigest())
        return results


def make_writer(
    path: str | os.PathLike,
    *,
    thread_count: int,
    digests: dict[str, tuple[int, str]] | None,
    kind: str = "staged",
) -> FileSystemWriter:
    """The storage writer for one save: :class:`StagedFileWriter` (``kind="staged"``) when this
    torch supports it, else DCP's ``FileSystemWriter`` (``kind="dcp"`` asks for it)."""
    if kind == "staged" and _AVAILABLE:
        return StagedFileWriter(path, thread_count=thread_count, digests=digests)
    return FileSystemWriter(path, thread_count=thread_count, sync_files=True)
