"""The parallel checkpoint reader loads what DCP wrote, bit for bit, through a pool of threads,
both into an existing state dict and into one rebuilt from metadata (the CLI's export), and a
broken file still fails the load. Real DCP, real files."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from kempnerforge.checkpoint.reader import CheckpointReader
from kempnerforge.checkpoint.safe_unpickle import SafeEmptyStateDictLoadPlanner, SafeLoadPlanner


def _state() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "model": {f"layer{i}.w": torch.randn(64, 40 + i, generator=g) for i in range(12)},
        "optimizer": {
            "state": {
                f"layer{i}.w": {"exp_avg": torch.randn(64, 40 + i, generator=g), "step": 7.0}
                for i in range(12)
            },
            "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "name": "adamw"}],
        },
    }


def _blank(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _blank(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_blank(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj)
    return obj


def _assert_same(a: object, b: object, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


class _RecordingPlanner(SafeLoadPlanner):
    """Notes which thread resolved each tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def resolve_tensor(self, read_item):  # type: ignore[no-untyped-def]
        self.threads.add(threading.current_thread().name)
        return super().resolve_tensor(read_item)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[dict, Path]:
    sd = _state()
    dcp.save(sd, storage_writer=FileSystemWriter(str(tmp_path), thread_count=4), no_dist=True)
    assert len(list(tmp_path.glob("*.distcp"))) == 4  # several files to read in parallel
    return sd, tmp_path


@pytest.mark.parametrize("threads", [4, 1])
def test_read_equals_written(saved: tuple[dict, Path], threads: int) -> None:
    """Several threads read in the pool; one thread reads in the caller, as DCP's reader does."""
    sd, path = saved
    target = _blank(sd)
    planner = _RecordingPlanner()
    reader = CheckpointReader(str(path), read_threads=threads)
    dcp.load(target, storage_reader=reader, planner=planner, no_dist=True)
    _assert_same(sd, target)
    if threads > 1:
        assert planner.threads and all(n.startswith("kempnerforge-read") for n in planner.threads)
    else:
        assert planner.threads == {threading.current_thread().name}


def test_rebuilt_from_metadata_in_parallel(saved: tuple[dict, Path]) -> None:
    """The export path creates nested dicts while reading: the planner's calls are serialized."""
    sd, path = saved
    for _ in range(3):
        out: dict = {}
        _load_state_dict(
            out,
            storage_reader=CheckpointReader(str(path), read_threads=8),
            planner=SafeEmptyStateDictLoadPlanner(),
            no_dist=True,
        )
        _assert_same(sd["model"], out["model"])
        assert out["optimizer"]["param_groups"][0]["lr"] == 3e-4
        for k, v in sd["optimizer"]["state"].items():
            assert torch.equal(out["optimizer"]["state"][k]["exp_avg"], v["exp_avg"])
            assert out["optimizer"]["state"][k]["step"] == 7.0


def test_truncated_file_fails_the_load(saved: tuple[dict, Path]) -> None:
    sd, path = saved
    victim = max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(BaseException) as info:  # DCP's CheckpointException is a BaseException
        dcp.load(
            _blank(sd),
            storage_reader=CheckpointReader(str(path), read_threads=4),
            planner=SafeLoadPlanner(),
            no_dist=True,
        )
    assert not isinstance(info.value, KeyboardInterrupt)


def test_read_threads_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="read_threads"):
        CheckpointReader(str(tmp_path), read_threads=0)
