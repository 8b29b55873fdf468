"""Contract of kempnerforge.checkpoint on real DCP files, one process (no process group)."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import resource
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from kempnerforge.checkpoint import (
    AsyncCheckpointer,
    CheckpointError,
    CheckpointManager,
    build_train_state,
    get_rng_state,
    restore_train_state,
    set_rng_state,
    storage,
)
from kempnerforge.checkpoint.state import serialize_train_state
from kempnerforge.config import AsyncCheckpointMode, CheckpointConfig
from kempnerforge.freeze import FreezeSpec, canonical_freeze_meta

MODES = ["disabled", "async", "async_with_pinned_mem"]


def tiny(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 1) -> None:
    for _ in range(steps):
        model(torch.randn(3, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def moments(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [
        t.clone() for s in opt.state.values() for k, t in sorted(s.items()) if torch.is_tensor(t)
    ]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def mgr_for(
    tmp_path: Path, mode: str = "disabled", **kw
) -> tuple[CheckpointManager, torch.nn.Module, torch.optim.Optimizer]:
    model, opt = tiny(kw.pop("seed", 0))
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"), async_mode=mode, **kw)
    return CheckpointManager(cfg, model, opt), model, opt


# --------------------------------------------------------------------------------- config
def test_config_modes_and_validation() -> None:
    assert [m.value for m in AsyncCheckpointMode] == ["disabled", "async", "async_with_pinned_mem"]
    assert AsyncCheckpointMode.async_.value == "async"
    c = CheckpointConfig()
    assert c.async_mode is AsyncCheckpointMode.disabled and c.keep_last_n == 3
    assert (
        CheckpointConfig(async_mode="async_with_pinned_mem").async_mode
        is AsyncCheckpointMode.async_pinned
    )
    with pytest.raises(ValueError, match="async_mode"):
        CheckpointConfig(async_mode="sometimes")
    with pytest.raises(ValueError, match="interval"):
        CheckpointConfig(interval=0)


def test_manager_refuses_empty_dir() -> None:
    model, opt = tiny()
    with pytest.raises(ValueError, match=r"checkpoint\.dir"):
        CheckpointManager(CheckpointConfig(), model, opt)


# --------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("mode", MODES)
def test_round_trip_bit_exact_and_layout(tmp_path: Path, mode: str) -> None:
    mgr, model, opt = mgr_for(tmp_path, mode)
    train(model, opt, 2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched.step()
    mgr.save(7, tokens_seen=700, scheduler=sched, extra={"phase": "warm", "vec": torch.arange(3)})
    mgr.wait()
    want_p, want_m = params(model), moments(opt)

    d = tmp_path / "ckpt"
    assert os.readlink(d / "latest") == "step_7"  # relative
    step = d / "step_7"
    assert (step / ".metadata").is_file() and list(step.glob("*.distcp"))
    meta = json.loads((step / "metadata.json").read_text())
    assert meta["step"] == 7 and meta["tokens_seen"] == 700 and meta["world_size"] == 1
    files = meta["manifest"]["files"]
    assert "train_state/rank_00000.pt" in files and ".metadata" in files
    for rel, e in files.items():
        assert (step / rel).stat().st_size == e["size"]
    # train state loads without pickle
    ts = torch.load(step / "train_state/rank_00000.pt", weights_only=True)
    assert ts["step"] == 7 and isinstance(ts["rng"]["numpy"]["keys"], torch.Tensor)

    model2, opt2 = tiny(seed=1)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    mgr2 = CheckpointManager(mgr.config, model2, opt2)
    assert not same(params(model2), want_p)
    step_, tokens, extra = mgr2.load(scheduler=sched2)
    assert (step_, tokens) == (7, 700)
    assert extra["phase"] == "warm" and torch.equal(extra["vec"], torch.arange(3))
    assert not {"step", "tokens_seen", "rng", "scheduler", "dataloader"} & extra.keys()
    assert same(params(model2), want_p)
    assert all(torch.equal(a, b) for a, b in zip(moments(opt2), want_m)) and len(want_m) > 0
    assert sched2.state_dict()["last_epoch"] == 1
    mgr.close()


def test_nothing_to_resume(tmp_path: Path) -> None:
    mgr, _, _ = mgr_for(tmp_path)
    assert mgr.peek_saved_step() is None
    assert mgr.load() == (0, 0, {})


def test_explicit_missing_path(tmp_path: Path) -> None:
    mgr, _, _ = mgr_for(tmp_path)
    missing = tmp_path / "nope" / "step_3"
    assert mgr.peek_saved_step(str(missing)) is None
    with pytest.raises(FileNotFoundError, match=str(missing)):
        mgr.load(str(missing))


def test_exclude_keys(tmp_path: Path) -> None:
    mgr, model, opt = mgr_for(tmp_path)
    train(model, opt)
    mgr.save(1)
    saved_p, saved_m = params(model), moments(opt)
    train(model, opt, 2)
    cur_p, cur_m = params(model), moments(opt)

    mgr.load(exclude_keys=["optimizer"])
    assert same(params(model), saved_p)
    assert all(torch.equal(a, b) for a, b in zip(moments(opt), cur_m))  # untouched

    train(model, opt)
    cur_p = params(model)
    mgr.load(exclude_keys=["model"])
    assert same(params(model), cur_p)
    assert all(torch.equal(a, b) for a, b in zip(moments(opt), saved_m))
    with pytest.raises(ValueError, match="exclude_keys"):
        mgr.load(exclude_keys=["weights"])


def test_config_exclude_applies_to_foreign_source_only(tmp_path: Path) -> None:
    src, model, opt = mgr_for(tmp_path / "pretrain")
    train(model, opt)
    src.save(5)
    src_m = moments(opt)
    model2, opt2 = tiny(3)
    train(model2, opt2)
    mine_m = moments(opt2)
    cfg = CheckpointConfig(
        dir=str(tmp_path / "finetune"),
        load_path=str(tmp_path / "pretrain" / "ckpt"),
        exclude_from_loading=["optimizer"],
    )
    ft = CheckpointManager(cfg, model2, opt2)
    assert ft.peek_saved_step() == 5
    assert ft.load()[0] == 5
    assert same(params(model2), params(model))
    assert all(torch.equal(a, b) for a, b in zip(moments(opt2), mine_m))  # excluded from load_path
    # the run's own checkpoint wins over load_path and restores everything (exact requeue)
    ft.save(6)
    want = moments(opt2)
    train(model2, opt2)
    assert ft.load()[0] == 6
    assert all(torch.equal(a, b) for a, b in zip(moments(opt2), want))
    assert not all(torch.equal(a, b) for a, b in zip(want, src_m))


# --------------------------------------------------------------------------------- train state
def test_build_and_restore_train_state() -> None:
    class Loader:
        def __init__(self) -> None:
            self.pos = 3

        def state_dict(self) -> dict:
            return {"pos": self.pos}

        def load_state_dict(self, s: dict) -> None:
            self.pos = s["pos"]

    st = build_train_state(4, 40, dataloader=Loader(), extra={"a": 1})
    assert (
        st["step"] == 4
        and st["tokens_seen"] == 40
        and "rng" in st
        and st["dataloader"] == {"pos": 3}
    )
    assert st["a"] == 1 and "scheduler" not in st
    with pytest.raises(ValueError, match="reserved"):
        build_train_state(1, 1, extra={"rng": 0})
    loader = Loader()
    loader.pos = 0
    assert restore_train_state(st, dataloader=loader) == (4, 40, {"a": 1})
    assert loader.pos == 3


def test_rng_round_trip_is_weights_only_loadable() -> None:
    """The original's keys in memory; on disk a form ``weights_only`` loading accepts."""
    state = get_rng_state()
    assert {"python", "numpy", "torch_cpu"} <= set(state)
    loaded = torch.load(io.BytesIO(serialize_train_state({"rng": state})), weights_only=True)["rng"]
    want = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(loaded)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_rng_is_that_of_the_saved_step(tmp_path: Path, mode: str) -> None:
    mgr, _, _ = mgr_for(tmp_path, mode)
    torch.manual_seed(5)
    mgr.save(1)
    want = torch.rand(4)  # drawn after save() returned, before the async write finished
    mgr.wait()
    torch.rand(100)
    mgr.load()
    assert torch.equal(torch.rand(4), want)


def test_unsafe_train_state_refused_at_save(tmp_path: Path) -> None:
    mgr, _, _ = mgr_for(tmp_path)

    class Custom:
        pass

    with pytest.raises(ValueError, match="'bad'"):
        mgr.save(1, extra={"bad": Custom()})
    assert not (tmp_path / "ckpt" / "latest").exists()


def test_pickle_payload_in_train_state_never_executes(tmp_path: Path) -> None:
    mgr, _, _ = mgr_for(tmp_path, verify_on_load="none")
    mgr.save(1)
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    f = tmp_path / "ckpt" / "step_1" / "train_state" / "rank_00000.pt"
    torch.save({"step": 1, "x": Evil()}, f)
    with pytest.raises(ValueError, match=r"rank_00000\.pt"):
        mgr.load()
    assert not flag.exists()


def test_dataloader_state_stash(tmp_path: Path) -> None:
    class Loader:
        def __init__(self, pos: int = 0) -> None:
            self.pos = pos

        def state_dict(self) -> dict:
            return {"pos": self.pos}

        def load_state_dict(self, s: dict) -> None:
            self.pos = s["pos"]

    mgr, _, _ = mgr_for(tmp_path)
    mgr.save(2, dataloader=Loader(11))
    mgr.load()  # no loader yet: stashed
    late = Loader()
    mgr.apply_dataloader_state(late)
    assert late.pos == 11
    again = Loader()
    mgr.apply_dataloader_state(again)  # stash was cleared
    assert again.pos == 0
    mgr.load()
    mgr.apply_dataloader_state(object())  # no load_state_dict: no-op, stash cleared
    mgr.apply_dataloader_state(again)
    assert again.pos == 0
    direct = Loader()
    mgr.load(dataloader=direct)
    assert direct.pos == 11


# --------------------------------------------------------------------------------- freeze
def test_freeze_metadata_and_mismatch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    saved = canonical_freeze_meta([FreezeSpec("vision", True), FreezeSpec("llm", False)])
    mgr, model, opt = mgr_for(tmp_path)
    mgr.save(3, extra={"vlm_freeze": saved})
    meta = json.loads((tmp_path / "ckpt" / "step_3" / "metadata.json").read_text())
    assert meta["vlm_freeze"] == [
        {"module": "llm", "frozen": False},
        {"module": "vision", "frozen": True},
    ]

    assert mgr.load(vlm_freeze_expected=saved)[0] == 3
    mgr.load(vlm_freeze_expected=None)  # no check
    # only shared module keys are compared
    mgr.load(
        vlm_freeze_expected=canonical_freeze_meta(
            [FreezeSpec("vision", True), FreezeSpec("proj", False)]
        )
    )
    bad = canonical_freeze_meta([FreezeSpec("vision", False)])
    with pytest.raises(ValueError, match="freeze mismatch"):
        mgr.load(vlm_freeze_expected=bad)
    lenient = CheckpointManager(
        CheckpointConfig(dir=mgr.config.dir, ignore_freeze_mismatch=True), model, opt
    )
    with caplog.at_level(logging.WARNING):
        assert lenient.load(vlm_freeze_expected=bad)[0] == 3
    assert "freeze mismatch" in caplog.text

    plain, _, _ = mgr_for(tmp_path / "nofreeze")
    plain.save(1)
    plain.load(vlm_freeze_expected=bad)  # nothing saved: no check


# --------------------------------------------------------------------------------- peek
def test_peek_none_for_broken_metadata(tmp_path: Path) -> None:
    mgr, _, _ = mgr_for(tmp_path)
    mgr.save(4)
    step = tmp_path / "ckpt" / "step_4"
    assert mgr.peek_saved_step() == 4 == mgr.peek_saved_step(str(step))
    (step / "metadata.json").write_text("{not json")
    assert mgr.peek_saved_step(str(step)) is None
    (step / "metadata.json").write_text(json.dumps({"tokens_seen": 1}))
    assert mgr.peek_saved_step(str(step)) is None
    (step / "metadata.json").unlink()
    assert mgr.peek_saved_step(str(step)) is None
    assert mgr.peek_saved_step() is None  # the only checkpoint is broken
    with pytest.raises(FileNotFoundError, match=r"metadata\.json"):
        mgr.load(str(step))


# --------------------------------------------------------------------------------- durability
def test_sync_latest_committed_before_return_and_dirs_0700(tmp_path: Path) -> None:
    mgr, _, _ = mgr_for(tmp_path)
    for s in (1, 2):
        mgr.save(s)
        assert os.readlink(tmp_path / "ckpt" / "latest") == f"step_{s}"
        assert json.loads((tmp_path / "ckpt" / "latest" / "metadata.json").read_text())["step"] == s
    for d in (
        tmp_path / "ckpt",
        tmp_path / "ckpt" / "step_2",
        tmp_path / "ckpt" / "step_2" / "train_state",
    ):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".tmp_step_")]
    mgr2, _, _ = mgr_for(tmp_path / "b", dir_mode=0o750)
    mgr2.save(1)
    assert stat.S_IMODE((tmp_path / "b" / "ckpt" / "step_1").stat().st_mode) == 0o750


def test_same_step_saved_twice_replaces_whole(tmp_path: Path) -> None:
    mgr, model, opt = mgr_for(tmp_path)
    mgr.save(5, tokens_seen=1)
    train(model, opt)
    want = params(model)
    mgr.save(5, tokens_seen=2)
    meta = json.loads((tmp_path / "ckpt" / "step_5" / "metadata.json").read_text())
    assert meta["tokens_seen"] == 2
    assert storage.verify_step_dir(tmp_path / "ckpt" / "step_5", "full") == []
    model2, opt2 = tiny(9)
    assert CheckpointManager(mgr.config, model2, opt2).load() == (5, 2, {})
    assert same(params(model2), want)


# --------------------------------------------------------------------------------- fallback
def _three_steps(tmp_path: Path, **kw) -> CheckpointManager:
    mgr, model, opt = mgr_for(tmp_path, keep_last_n=0, **kw)
    for s in (1, 2, 3):
        train(model, opt)
        mgr.save(s)
    return mgr


def test_fallback_when_latest_is_incomplete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = _three_steps(tmp_path)
    shard = sorted((tmp_path / "ckpt" / "step_3").glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(10)
    with caplog.at_level(logging.WARNING):
        assert mgr.peek_saved_step() == 2
    assert shard.name in caplog.text and "truncated" in caplog.text
    assert mgr.load()[0] == 2
    with pytest.raises(FileNotFoundError, match=shard.name):
        mgr.load(str(tmp_path / "ckpt" / "step_3"))  # explicit: error, not fallback


def test_fallback_latest_missing_dangling_or_outside(tmp_path: Path) -> None:
    mgr = _three_steps(tmp_path)
    d = tmp_path / "ckpt"
    shutil_rm = d / "step_3" / ".metadata"
    shutil_rm.unlink()  # step_3 incomplete
    (d / "latest").unlink()
    assert mgr.peek_saved_step() == 2
    os.symlink("step_9", d / "latest")
    assert mgr.peek_saved_step() == 2
    (d / "latest").unlink()
    os.symlink(str(d / "step_1"), d / "latest")  # absolute / outside-style link: refused
    assert mgr.peek_saved_step() == 2
    (d / "step_abc").mkdir()
    assert mgr.load()[0] == 2


def test_full_verification_detects_bit_flip(tmp_path: Path) -> None:
    mgr = _three_steps(tmp_path, verify_on_load="full")
    shard = max((tmp_path / "ckpt" / "step_3").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert mgr.peek_saved_step() == 2
    size_only = CheckpointManager(
        CheckpointConfig(dir=mgr.config.dir, verify_on_load="size"), mgr.model, mgr.optimizer
    )
    assert size_only.peek_saved_step() == 3  # same size: only checksums see it
    problems = storage.verify_step_dir(tmp_path / "ckpt" / "step_3", "full")
    assert problems and shard.name in str(problems[0])


# --------------------------------------------------------------------------------- retention
def test_retention_by_commit_order(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    mgr, _, _ = mgr_for(tmp_path, keep_last_n=3)
    for s in (10, 20, 30):
        mgr.save(s)
    (d / "step_abc").mkdir()
    (d / "notes").mkdir()
    mgr.load(str(d / "step_10"))  # go back, continue on a new branch
    mgr.save(11)
    mgr.save(12)
    mgr.close()
    names = sorted(p.name for p in d.iterdir() if not p.name.startswith("."))
    # the run ledger stays too: retention only ever touches step directories
    assert names == ["events.jsonl", "latest", "notes", "step_11", "step_12", "step_30", "step_abc"]
    assert not list((d / ".trash").iterdir())  # deleted in the background, finished by close()
    keep_all, _, _ = mgr_for(tmp_path / "all", keep_last_n=0)
    for s in range(1, 6):
        keep_all.save(s)
    assert len(storage.list_step_dirs(tmp_path / "all" / "ckpt")) == 5


def test_keep_last_one_keeps_latest(tmp_path: Path) -> None:
    mgr, _, _ = mgr_for(tmp_path, keep_last_n=1)
    for s in (1, 2, 3):
        mgr.save(s)
    assert [p.name for _, p in storage.list_step_dirs(tmp_path / "ckpt")] == ["step_3"]
    assert os.readlink(tmp_path / "ckpt" / "latest") == "step_3"


# --------------------------------------------------------------------------------- async
def test_async_stages_a_snapshot_and_reuses_buffers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr, model, opt = mgr_for(tmp_path, "async")
    train(model, opt)
    with caplog.at_level(logging.INFO):
        mgr.save(1)
        want = params(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # mutate while the write may still be running
        mgr.wait()
        first = mgr.last_save_stats
        assert first.new_host_bytes > 0 and first.committed and first.bytes > 0
        mgr.save(2)
        mgr.flush_pending_save()
    second = mgr.last_save_stats
    assert second.new_host_bytes == 0 and second.step == 2 and second.total_bytes > 0
    assert second.durable_s >= second.blocked_s > 0 and second.gbps > 0
    assert os.readlink(tmp_path / "ckpt" / "latest") == "step_2"
    lines = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint step=")
    ]
    assert len(lines) == 2 and all(
        k in lines[1] for k in ("bytes=", "blocked=", "durable=", "GB/s")
    )
    model2, opt2 = tiny(4)
    CheckpointManager(mgr.config, model2, opt2).load(str(tmp_path / "ckpt" / "step_1"))
    assert same(params(model2), want)
    mgr.wait()  # nothing in flight: returns at once
    mgr.flush_pending_save()
    mgr.close()


def test_pinned_mode_on_cpu_degrades_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with caplog.at_level(logging.INFO):
        ac = AsyncCheckpointer(AsyncCheckpointMode.async_pinned)
    assert ac.is_async and not ac.pinned
    assert sum("pinned" in r.getMessage() for r in caplog.records) == 1


def test_background_error_surfaces_and_keeps_latest(tmp_path: Path) -> None:
    """A real write error (RLIMIT_FSIZE makes writes past 4 KiB fail with EFBIG, like a full disk)."""
    mgr, model, opt = mgr_for(tmp_path, "async")
    mgr.save(1)
    mgr.wait()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        train(model, opt)
        mgr.save(2)  # returns: the failure happens in the background
        assert mgr.checkpointer.join(timeout=60)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert os.readlink(tmp_path / "ckpt" / "latest") == "step_1"
    assert not (tmp_path / "ckpt" / "step_2").exists()
    with pytest.raises(CheckpointError, match=r"step_2|File too large"):
        mgr.save(3)
    mgr.save(3)  # the error was reported once; saving works again
    mgr.wait()
    assert os.readlink(tmp_path / "ckpt" / "latest") == "step_3"


def test_sync_error_raises_and_keeps_latest(tmp_path: Path) -> None:
    mgr, _, _ = mgr_for(tmp_path)
    mgr.save(1)
    d = tmp_path / "ckpt"
    (d / "latest").unlink()
    (d / "latest").mkdir()  # a directory in the way: the swap must fail loudly
    (d / "latest" / "x").touch()
    with pytest.raises(CheckpointError, match="not committed"):
        mgr.save(2)


@pytest.mark.gpu
def test_pinned_staging_on_cuda_reuses_pinned_buffers(tmp_path: Path) -> None:
    model, opt = tiny()
    model.cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4, device="cuda")).sum().backward()
    opt.step()
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"), async_mode="async_with_pinned_mem")
    mgr = CheckpointManager(cfg, model, opt)
    assert mgr.checkpointer.pinned
    mgr.save(1)
    mgr.wait()
    assert mgr.last_save_stats.new_host_bytes > 0
    bufs = list(mgr.checkpointer._stager._buffers.values())
    assert bufs and all(b.is_pinned() for b in bufs)
    mgr.save(2)
    mgr.wait()
    assert mgr.last_save_stats.new_host_bytes == 0
    model2 = tiny(5)[0].cuda()
    CheckpointManager(cfg, model2, torch.optim.AdamW(model2.parameters())).load()
    assert same(params(model2), params(model))


def test_stock_dcp_tools_read_our_checkpoints(tmp_path: Path) -> None:
    """torch's own FileSystemReader + dcp.load and dcp_to_torch_save read a step of ours."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    mgr, model, _ = mgr_for(tmp_path, "async")
    mgr.save(3)
    mgr.wait()
    step = tmp_path / "ckpt" / "step_3"
    fresh = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    dcp.load({"model": fresh}, storage_reader=dcp.FileSystemReader(str(step)), no_dist=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh[k], v), k
    dcp_to_torch_save(str(step), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    for k, v in model.state_dict().items():
        assert torch.equal(full["model"][k], v), k
    mgr.close()
