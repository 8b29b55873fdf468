"""The checkpoint's fast paths keep the contract: hashing while writing, pooled host copies,
buffers prepared ahead, deferred device-to-host copies, and a close that skips trash deletion.

Real DCP files on disk, one process. The GPU test needs a CUDA device (marker ``gpu``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kempnerforge.checkpoint import CheckpointManager, storage
from kempnerforge.checkpoint.async_save import HostStager, balance
from kempnerforge.config import CheckpointConfig


def model_and_opt(width: int = 8, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, device: str = "cpu") -> None:
    model(torch.randn(3, 4, device=device)).square().sum().backward()
    opt.step()
    opt.zero_grad()


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [v.detach().cpu().clone() for v in model.state_dict().values()]
    for s in opt.state.values():
        out += [t.detach().cpu().clone() for _, t in sorted(s.items()) if torch.is_tensor(t)]
    return out


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_manifest_hashed_while_writing_needs_no_reread(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = model_and_opt()
    step(model, opt)
    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "ck"), async_mode=mode), model, opt)
    reads: list[str] = []
    real = storage.checksum_file

    def counting(path: os.PathLike | str, chunk: int = 8 << 20) -> tuple[int, str]:
        reads.append(Path(path).name)
        return real(path, chunk)

    monkeypatch.setattr(storage, "checksum_file", counting)
    mgr.save(1)
    mgr.wait()
    monkeypatch.setattr(storage, "checksum_file", real)
    mgr.close()
    step_dir = tmp_path / "ck" / "step_1"
    meta, prob = storage.read_metadata(step_dir)
    assert prob is None and meta is not None
    files = meta["manifest"]["files"]
    assert ".metadata" in files and any(f.endswith(".distcp") for f in files)
    # every DCP file's digest came from the write stream; only the train state was read back
    assert not [r for r in reads if r.endswith(".distcp") or r == ".metadata"], reads
    for rel, entry in files.items():  # and the digests are those of the bytes on disk
        assert real(step_dir / rel) == (entry["size"], entry[storage.CHECKSUM_ALGO]), rel
    assert storage.verify_step_dir(step_dir, "full") == []


def test_hashing_stream_falls_back_after_a_seek(tmp_path: Path) -> None:
    sink: dict[str, tuple[int, str]] = {}
    fs = storage.hashing_filesystem(sink)
    assert fs is not None
    with fs.create_stream(tmp_path / "a", "wb") as s:
        s.write(b"hello ")
        s.write(memoryview(b"world"))
    with fs.create_stream(tmp_path / "b", "wb") as s:
        s.write(b"xxxx")
        s.seek(0)
        s.write(b"y")
    assert sink == {"a": storage.checksum_file(tmp_path / "a")}  # "b" is re-read by the manifest
    entries = storage.manifest_entries(tmp_path, ["a", "b"], {"a": sink["a"], "b": (3, "stale")})
    assert entries["b"][storage.CHECKSUM_ALGO] == storage.checksum_file(tmp_path / "b")[1]


def test_balanced_host_copies_are_exact() -> None:
    torch.manual_seed(0)
    srcs = [torch.randn(n) for n in (5_000_000, 300, 1_200_000, 7, 2_500_000)] + [
        torch.randn(64, 33).t()  # non-contiguous source
    ]
    dsts = [torch.empty_like(s) for s in srcs]
    bins = balance(list(zip(dsts, srcs)), 3, chunk=1 << 20)
    sizes = [sum(d.numel() * d.element_size() for d, _ in b) for b in bins]
    assert sum(sizes) == sum(s.numel() * s.element_size() for s in srcs)
    assert max(sizes) - min(sizes) <= 1 << 20  # within one piece of each other
    stager = HostStager(pinned=False, copy_threads=3)
    sd = {"a": srcs[:3], "b": {"c": srcs[3], "d": srcs[4], "e": srcs[5]}, "n": 3}
    staged, nbytes, new = stager.stage(sd)
    assert new == nbytes == sum(s.numel() * s.element_size() for s in srcs)
    flat = [*staged["a"], staged["b"]["c"], staged["b"]["d"], staged["b"]["e"]]
    assert all(torch.equal(a, b) for a, b in zip(flat, srcs)) and staged["n"] == 3
    assert torch.get_num_threads() >= 1
    stager.close()


def test_prepare_allocates_before_the_first_save(tmp_path: Path) -> None:
    model, opt = model_and_opt(width=64)
    step(model, opt)
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(tmp_path / "ck"), async_mode="async"), model, opt
    )
    assert mgr.prepare() is True
    assert mgr.prepare() is False  # once
    mgr.save(1)
    mgr.wait()
    assert mgr.last_save_stats.new_host_bytes == 0
    assert mgr.checkpointer.host_buffer_bytes() >= mgr.last_save_stats.bytes > 0
    mgr.close()


def test_close_without_waiting_for_trash_then_next_run_empties_it(tmp_path: Path) -> None:
    model, opt = model_and_opt()
    cfg = CheckpointConfig(dir=str(tmp_path / "ck"), keep_last_n=1)
    mgr = CheckpointManager(cfg, model, opt)
    trash = tmp_path / "ck" / ".trash"
    mgr.save(1)
    (trash / "left-over").mkdir(parents=True)  # as if a pruned step's deletion had not finished
    (trash / "left-over" / "x").write_bytes(b"1" * 10)
    mgr.close(wait_for_trash=False)
    mgr.close()  # a second close is harmless
    assert os.readlink(tmp_path / "ck" / "latest") == "step_1"
    mgr2 = CheckpointManager(cfg, model, opt)
    mgr2.save(2)
    mgr2.close()  # waits for the deletion the first save scheduled
    assert not any(trash.iterdir())


@pytest.mark.gpu
def test_deferred_copy_saves_pre_step_values(tmp_path: Path) -> None:
    """save() returns before the device-to-host copy finished; the very next optimizer step must
    not leak into the checkpoint (its pre-hook makes the step wait for the copy)."""
    model, opt = model_and_opt(width=4096)
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-1)
    cfg = CheckpointConfig(dir=str(tmp_path / "ck"), async_mode="async_with_pinned_mem")
    mgr = CheckpointManager(cfg, model, opt)
    for _ in range(2):
        step(model, opt, "cuda")  # the first step's post-hook prepares the pinned buffers
    mgr.wait()
    before = snapshot(model, opt)
    for i in range(3):
        mgr.save(10 + i)
        assert mgr.last_save_stats.new_host_bytes == 0
        step(model, opt, "cuda")  # mutates parameters and moments in place, right away
        mgr.wait()
        assert mgr.last_save_stats.staged_s > 0
        model2, _ = model_and_opt(width=4096, seed=1)
        model2.cuda()
        opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-1)
        step(model2, opt2, "cuda")
        CheckpointManager(cfg, model2, opt2).load()
        loaded = snapshot(model2, opt2)
        assert len(loaded) == len(before)
        assert all(torch.equal(a, b) for a, b in zip(loaded, before)), f"save {10 + i}"
        before = snapshot(model, opt)
    mgr.close()
