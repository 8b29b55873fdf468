"""The staged storage writer writes DCP's own format: plain ``dcp.load`` with torch's
``FileSystemReader`` reads it back bit for bit, its running checksums match the files, and it
leaves torch's process-wide CRC setting as it found it. Real DCP, real files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from kempnerforge.checkpoint.storage import checksum_file, hashing_filesystem
from kempnerforge.checkpoint.writer import StagedFileWriter, assign_files, make_writer


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(64, 33, generator=g)
    return {
        "w": torch.randn(300, 17, generator=g),
        "bf16": torch.randn(50, 8, generator=g).to(torch.bfloat16),
        "ints": torch.arange(1000, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": big.t(),  # not contiguous
        "slice": big[10:20],  # a view into a larger storage: only its bytes are saved
        "nested": {"a": torch.ones(7), "lr": 0.125, "name": "adamw", "betas": (0.9, 0.95)},
    }


def _blank(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out[k] = _blank(v)
        elif isinstance(v, torch.Tensor):
            out[k] = torch.full_like(v.contiguous(), 7)
        else:
            out[k] = None
    return out


def _equal(a: dict, b: dict) -> None:
    for k, v in a.items():
        if isinstance(v, dict):
            _equal(v, b[k])
        elif isinstance(v, torch.Tensor):
            assert v.dtype == b[k].dtype and v.shape == b[k].shape, k
            assert torch.equal(
                v.contiguous().view(-1).view(torch.uint8),
                b[k].contiguous().view(-1).view(torch.uint8),
            ), k
        else:
            assert v == b[k], k


@pytest.mark.parametrize("threads", [1, 3, 16])
def test_plain_dcp_load_reads_it_bit_exact_and_digests_match(tmp_path: Path, threads: int) -> None:
    sd = _state()
    digests: dict[str, tuple[int, str]] = {}
    w = StagedFileWriter(tmp_path, thread_count=threads, digests=digests)
    w.fs = hashing_filesystem(digests)  # .metadata is hashed through DCP's filesystem hook
    dcp.save(sd, storage_writer=w, no_dist=True)

    shards = sorted(p.name for p in tmp_path.glob("*.distcp"))
    assert 1 <= len(shards) <= threads
    assert set(digests) == {*shards, ".metadata"}
    for name, (size, digest) in digests.items():
        assert checksum_file(tmp_path / name) == (size, digest), name

    out = _blank(sd)
    dcp.load(out, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    _equal(sd, out)


def test_same_bytes_as_dcp_filesystemwriter_can_read(tmp_path: Path) -> None:
    """A checkpoint written by torch's own writer and one written by ours load to the same state."""
    sd = _state()
    dcp.save(sd, storage_writer=FileSystemWriter(tmp_path / "dcp", thread_count=2), no_dist=True)
    dcp.save(
        sd,
        storage_writer=make_writer(tmp_path / "ours", thread_count=2, digests=None),
        no_dist=True,
    )
    a, b = _blank(sd), _blank(sd)
    dcp.load(a, storage_reader=FileSystemReader(tmp_path / "dcp"), no_dist=True)
    dcp.load(b, storage_reader=FileSystemReader(tmp_path / "ours"), no_dist=True)
    _equal(a, b)


def test_crc_setting_restored_after_success_and_failure(tmp_path: Path) -> None:
    get = torch.serialization.get_crc32_options
    assert get() is True
    dcp.save(
        _state(), storage_writer=StagedFileWriter(tmp_path / "ok", thread_count=2), no_dist=True
    )
    assert get() is True
    bad = tmp_path / "bad"
    (bad / "__0_1.distcp").mkdir(parents=True)  # the second shard file cannot be opened
    with pytest.raises(BaseException, match="directory"):  # DCP wraps it (a BaseException)
        dcp.save(_state(), storage_writer=StagedFileWriter(bad, thread_count=2), no_dist=True)
    assert get() is True


def test_assign_files_balances_bytes() -> None:
    from torch.distributed.checkpoint.default_planner import create_default_local_save_plan

    sd = {f"t{i}": torch.empty(n) for i, n in enumerate([1000, 900, 500, 400, 300, 100, 100, 50])}
    sd["obj"] = {"x": 1}
    plan = create_default_local_save_plan(sd, is_coordinator=True)
    groups = assign_files(list(plan.items), 3)
    assert sorted(i for g in groups for i in map(id, g)) == sorted(map(id, plan.items))
    loads = [sum(it.tensor_data.size.numel() for it in g if it.tensor_data) for g in groups]
    assert max(loads) <= 1.1 * sum(loads) / 3, loads  # greedy largest-first: near the even split
    assert len(assign_files(list(plan.items), 64)) == len(plan.items)  # no empty files


def test_later_saves_write_the_same_bytes_without_torch_save(tmp_path: Path) -> None:
    """After the first save, tensors are framed from learned templates: the files must be
    byte-identical to the first save's, and new values must load back exactly."""
    from kempnerforge.checkpoint import writer

    sd = _state()
    sd["fresh_kind"] = torch.randn(11, 13, 17)  # a kind no earlier test saved
    dcp.save(sd, storage_writer=StagedFileWriter(tmp_path / "a", thread_count=2), no_dist=True)
    key_dtypes = {k[0] for k, v in writer._TEMPLATES._known.items() if v is not None}
    assert {torch.float32, torch.bfloat16, torch.int64} <= key_dtypes  # data writes recognised
    calls = []
    real_save = torch.save
    torch.save = lambda *a, **k: (calls.append(a), real_save(*a, **k))[1]  # count, still save
    try:
        dcp.save(sd, storage_writer=StagedFileWriter(tmp_path / "b", thread_count=2), no_dist=True)
    finally:
        torch.save = real_save
    tensor_calls = [a for a in calls if isinstance(a[0], torch.Tensor) and a[0].numel() > 0]
    assert tensor_calls == [], f"{len(tensor_calls)} tensors still went through torch.save"
    for f in sorted((tmp_path / "a").glob("*.distcp")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name

    sd2 = {
        k: (v * 3 if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in sd.items()
    }
    dcp.save(sd2, storage_writer=StagedFileWriter(tmp_path / "c", thread_count=3), no_dist=True)
    out = _blank(sd2)
    dcp.load(out, storage_reader=FileSystemReader(tmp_path / "c"), no_dist=True)
    _equal(sd2, out)
