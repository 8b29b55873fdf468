"""Read checkpoint metadata without executing anything a file asks for.

DCP stores its ``.metadata`` as a pickle and reads it with ``pickle.load``; it reads non-tensor
values (optimizer hyper-parameters and the like) with ``torch.load(weights_only=False)``. A
checkpoint directory is just files on a shared filesystem, so either is a way to run foreign
code in every rank of the next job that resumes from it. This module closes both doors:

* :class:`RestrictedUnpickler` resolves only the classes a real DCP ``.metadata`` contains
  (checked against what torch 2.13 writes: DCP's metadata dataclasses and enum, ``_StorageInfo``,
  ``torch.Size``, dtypes, layouts, ``pathlib`` paths). Any other global is refused with an
  error that names the file, before anything is called.
* :class:`SafeFileSystemReader` is DCP's ``FileSystemReader`` reading metadata through it.
* :class:`SafeLoadPlanner` / :class:`SafeEmptyStateDictLoadPlanner` load DCP's byte entries
  with ``torch.load(weights_only=True)``.

Our own ``metadata.json`` is read by :mod:`kempnerforge.checkpoint.storage`.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from kempnerforge.checkpoint.storage import DCP_METADATA_FILE, CheckpointFormatError

__all__ = [
    "CheckpointFormatError",
    "RestrictedUnpickler",
    "SafeEmptyStateDictLoadPlanner",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "UnsafeCheckpointError",
    "load_dcp_metadata",
    "restricted_loads",
]


class UnsafeCheckpointError(CheckpointFormatError):
    """A checkpoint file asks to load something outside the allowed set (never executed)."""


# (module, name) pairs a DCP .metadata may reference. Checked by saving real checkpoints
# (plain modules, AdamW, FSDP2 DTensors, non-tensor values) with torch 2.13.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # rebuilds torch.strided & co from their name
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("pathlib", "Path"),
        ("collections", "OrderedDict"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only DCP metadata classes (and dtypes); see module doc."""

    def __init__(self, file: Any, *, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self._source}: refused to load '{module}.{name}': DCP metadata never contains it, "
            "so this file was altered or is not a checkpoint of ours (nothing in it was run). "
            "Do not resume from it; re-save the checkpoint from a trusted run."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(
            f"{self._source}: refused a persistent-id reference; DCP metadata has none"
        )


def restricted_loads(data: bytes, *, source: str) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; errors name ``source``."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated/garbled pickles raise many types
        raise CheckpointFormatError(
            f"{source}: DCP metadata is unreadable ({type(e).__name__}: {e}); the checkpoint is "
            "corrupt or was cut short. Resume from an earlier checkpoint."
        ) from e


def load_dcp_metadata(path: str | os.PathLike) -> Metadata:
    """DCP's ``Metadata`` of a checkpoint (a step directory or its ``.metadata`` file), safely."""
    path = Path(path)
    file = path / DCP_METADATA_FILE if path.is_dir() else path
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointFormatError(
            f"{file}: missing; DCP writes it last, so this checkpoint is incomplete. "
            "Resume from an earlier checkpoint."
        ) from None
    md = restricted_loads(data, source=str(file))
    if not isinstance(md, Metadata):
        raise CheckpointFormatError(
            f"{file}: holds a {type(md).__name__}, not DCP Metadata; it is not a DCP checkpoint"
        )
    return md


class SafeFileSystemReader(FileSystemReader):
    """DCP's filesystem reader, with ``.metadata`` going through :class:`RestrictedUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            data = f.read()
        metadata = restricted_loads(data, source=str(path))
        if not isinstance(metadata, Metadata):
            raise CheckpointFormatError(
                f"{path}: holds a {type(metadata).__name__}, not DCP Metadata"
            )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_bytes_safely(value: io.BytesIO, fqn: str) -> Any:
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"checkpoint entry {fqn!r}: refused non-tensor data that needs arbitrary code to load "
            f"({e}); the checkpoint was altered or written by something else"
        ) from e


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose byte entries load with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = _load_bytes_safely(value, read_item.dest_index.fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeEmptyStateDictLoadPlanner(_EmptyStateDictLoadPlanner):
    """Rebuilds a state dict from metadata alone (no model needed), byte entries loaded safely."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        SafeLoadPlanner.load_bytes(self, read_item, value)  # type: ignore[arg-type]
