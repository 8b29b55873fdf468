"""Integrity holes in the checkpoint format and its users, each with a test that failed before.

1. An environment inherited from a parent that used the library must not make two jobs one.
2. Every committed checkpoint corrupt: an error naming each step, never a silent fresh start.
3. (tests/distributed/test_integrity_dist.py) ranks agree before the collective load.
4. ``kempnerforge ckpt ls`` and the manager agree on every directory below.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from _reliability_fixtures import shard_file, tiny_model, write_checkpoint
from helpers.kf_original import copy_kf_original

from kempnerforge.checkpoint import CheckpointManager, resolve, storage
from kempnerforge.checkpoint.lock import read_holder
from kempnerforge.cli import main as cli
from kempnerforge.config import CheckpointConfig


def _mgr(d: Path, **kw) -> CheckpointManager:
    model, opt = tiny_model(0)
    return CheckpointManager(CheckpointConfig(dir=str(d), **kw), model, opt)


# ------------------------------------------------------------------ 1: the job lock

JOB = textwrap.dedent(
    """
    import sys, time
    from kempnerforge.checkpoint import CheckpointManager
    from kempnerforge.config import CheckpointConfig
    import torch, torch.nn as nn
    m = nn.Linear(4, 2)
    mgr = CheckpointManager(CheckpointConfig(dir=sys.argv[1]), m, torch.optim.SGD(m.parameters(), lr=0.1))
    try:
        mgr.resume()
    except Exception as e:
        print("REFUSED", type(e).__name__, e, flush=True)
        sys.exit(3)
    mgr.save(int(sys.argv[2]))
    print("SAVED", flush=True)
    time.sleep(float(sys.argv[3]))
    """
)

PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    import torch, torch.nn as nn
    from kempnerforge.checkpoint import CheckpointManager
    from kempnerforge.config import CheckpointConfig
    own, jobs_dir, job = sys.argv[1], sys.argv[2], sys.argv[3]
    # A driver that used the library in-process first (an initial checkpoint of its own).
    m = nn.Linear(4, 2)
    mgr = CheckpointManager(CheckpointConfig(dir=own), m, torch.optim.SGD(m.parameters(), lr=0.1))
    mgr.resume()
    mgr.save(1)
    mgr.close()
    a = subprocess.Popen([sys.executable, "-c", job, jobs_dir, "10", "60"], stdout=subprocess.PIPE, text=True)
    assert a.stdout.readline().startswith("SAVED")
    b = subprocess.run([sys.executable, "-c", job, jobs_dir, "20", "0"], capture_output=True, text=True)
    a.kill()
    a.wait()
    print("B", b.returncode, b.stdout.strip(), flush=True)
    """
)


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "KEMPNERFORGE_"))
    }
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_parent_that_used_the_library_does_not_make_its_children_one_job(tmp_path: Path) -> None:
    """A parent saves a checkpoint of its own in-process, then starts job A and job B on one
    directory: B is refused before it writes anything, and the message names A."""
    jobs_dir = tmp_path / "jobs"
    res = subprocess.run(
        [sys.executable, "-c", PARENT, str(tmp_path / "own"), str(jobs_dir), JOB],
        capture_output=True,
        text=True,
        timeout=240,
        env=_clean_env(),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith("B 3 REFUSED CheckpointDirLockedError"), line
    assert "locked by job" in line and "pid" in line
    left = sorted(p.name for p in jobs_dir.iterdir() if not p.name.startswith(".lock"))
    # nothing of B's: no temp dir, no step_20 (the run ledger is A's)
    assert left == ["events.jsonl", "latest", "step_10"]


# ------------------------------------------------------------------ 2: every checkpoint corrupt


def _two_corrupt_steps(d: Path) -> None:
    mgr = _mgr(d)
    mgr.save(1)
    mgr.save(2)
    mgr.close()
    (d / "step_1" / storage.METADATA_FILE).write_text("{ torn")
    with open(shard_file(d / "step_2"), "r+b") as f:
        f.truncate(8)


def test_every_checkpoint_corrupt_raises_naming_each_and_keeps_them(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    _two_corrupt_steps(d)
    mgr = _mgr(d)
    with pytest.raises(FileNotFoundError) as ei:
        mgr.resume()
    text = str(ei.value)
    assert "step_1: " in text and "corrupt JSON" in text
    assert "step_2: " in text and "truncated" in text
    assert "on_all_corrupt=start_fresh" in text
    assert (d / "step_1").is_dir() and (d / "step_2").is_dir()
    mgr.close()


def test_start_fresh_switch_is_loud_and_keeps_the_corrupt_steps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "ckpt"
    _two_corrupt_steps(d)
    mgr = _mgr(d, on_all_corrupt="start_fresh", keep_last_n=1)
    with caplog.at_level(logging.ERROR):
        assert mgr.resume() == (0, 0, {})
    assert "TRAINS FROM STEP 0" in caplog.text and "step_2" in caplog.text
    for s in (3, 4, 5):  # retention (keep 1) must never prune the corrupt ones
        mgr.save(s)
        mgr.wait()
    mgr.close()
    names = sorted(p.name for p in d.iterdir() if p.name.startswith("step_"))
    assert names == ["step_1", "step_2", "step_5"]


def test_an_interrupted_original_save_is_not_corruption(tmp_path: Path) -> None:
    """The original KempnerForge wrote into step_N directly: a step without DCP's .metadata
    that latest does not name is a save that never finished, not a corrupt checkpoint."""
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "step_3").mkdir()
    (d / "step_3" / storage.METADATA_FILE).write_text('{"step": 3, "tokens_seen": 0}')
    (d / "step_3" / storage.ORIGINAL_TRAIN_STATE_FILE).write_bytes(b"x")
    mgr = _mgr(d)
    assert mgr.resume() == (0, 0, {})
    mgr.close()


# ------------------------------------------------------------------ 4: one resolver


def _fixtures(root: Path) -> dict[str, Path]:
    """Checkpoint directories of every kind the resolver has to judge."""
    out: dict[str, Path] = {}

    def fresh(name: str) -> Path:
        out[name] = root / name
        return out[name]

    d = fresh("good_and_interrupted")
    for s, seed in ((2, 0), (4, 1)):
        write_checkpoint(d, s, *tiny_model(seed))
    write_checkpoint(d, 6, *tiny_model(2), commit=False)

    d = fresh("pipeline_stage")
    model = nn.Linear(4, 2)
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(d)), model, torch.optim.SGD(model.parameters(), lr=0.1), pp_rank=0
    )
    mgr.save(3)
    mgr.close()

    d = copy_kf_original(fresh("original_layout"))  # what the original package wrote
    for p in d.rglob("*"):
        if not p.is_symlink():
            p.chmod(0o700 if p.is_dir() else 0o600)
    d.chmod(0o700)

    d = fresh("latest_is_a_file")
    write_checkpoint(d, 5, *tiny_model(0), move_latest=False)
    write_checkpoint(d, 7, *tiny_model(1), move_latest=False)
    (d / storage.LATEST).write_text("step_5\n")

    d = fresh("latest_dangling")
    write_checkpoint(d, 1, *tiny_model(0))
    (d / storage.LATEST).unlink()
    os.symlink("step_9", d / storage.LATEST)

    d = fresh("latest_truncated_falls_back")
    write_checkpoint(d, 1, *tiny_model(0))
    time.sleep(0.01)
    write_checkpoint(d, 2, *tiny_model(1))
    with open(shard_file(d / "step_2"), "r+b") as f:
        f.truncate(4)

    d = fresh("no_dcp_metadata")
    write_checkpoint(d, 1, *tiny_model(0))
    write_checkpoint(d, 2, *tiny_model(1))
    (d / "step_2" / storage.DCP_METADATA_FILE).unlink()

    d = fresh("all_corrupt")
    write_checkpoint(d, 1, *tiny_model(0))
    (d / "step_1" / storage.METADATA_FILE).write_text("nope")

    d = fresh("empty")
    d.mkdir(mode=0o700)
    return out


def _ls(capsys: pytest.CaptureFixture[str], d: Path) -> tuple[int | None, dict[int, str]]:
    assert cli(["ckpt", "ls", str(d)]) == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines()[1:] if ln[:1].isdigit()]
    marked = [int(r[0]) for r in rows if r[-2] == "*"]
    assert len(marked) <= 1, out
    return (marked[0] if marked else None), {int(r[0]): r[1] for r in rows}


def test_ckpt_ls_and_the_manager_agree_on_every_fixture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, d in _fixtures(tmp_path).items():
        resumes, status = _ls(capsys, d)
        pp = 0 if name == "pipeline_stage" else None
        model, opt = tiny_model(0)
        mgr = CheckpointManager(CheckpointConfig(dir=str(d)), model, opt, pp_rank=pp)
        if name == "all_corrupt":
            assert mgr.peek_saved_step() is None and resumes is None, name
            assert status == {1: "corrupt"}, (name, status)
            continue
        assert resumes == mgr.peek_saved_step() == resolve.resume_step(d), (name, status)
        for e in resolve.scan(d):
            want = "committed" if e.usable else ("corrupt" if e.corrupt else "incomplete")
            assert status[e.step] == want, (name, e)
        if resumes is not None:
            assert status[resumes] == "committed", (name, status)
    capsys.readouterr()


def test_lock_record_is_written_by_storage(tmp_path: Path) -> None:
    """The lock record and the requeue guard use the one atomic writer (no stray temp files)."""
    from kempnerforge.resilience.config import ResilienceConfig
    from kempnerforge.resilience.requeue import maybe_requeue

    mgr = _mgr(tmp_path / "ckpt")
    mgr.resume()
    assert read_holder(tmp_path / "ckpt") is not None
    assert maybe_requeue(ResilienceConfig(), str(tmp_path / "ckpt"), 1)
    leftovers = [p.name for p in (tmp_path / "ckpt").iterdir() if ".tmp" in p.name]
    assert leftovers == []
    mgr.close()
