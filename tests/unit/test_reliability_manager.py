"""Reliability bars through the real CheckpointManager: job lock on save paths, hostile inputs
with clear errors that name the file, and nothing already committed lost."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn

from kempnerforge.checkpoint import CheckpointManager, storage
from kempnerforge.checkpoint.assemble import model_state_dict
from kempnerforge.checkpoint.guards import CheckpointMismatchError, UnsafeCheckpointDirError
from kempnerforge.checkpoint.lock import read_holder
from kempnerforge.checkpoint.safe_unpickle import CheckpointFormatError
from kempnerforge.config import CheckpointConfig


def tiny(width: int = 8, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).square().sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def manager(d: Path, width: int = 8, **kw) -> CheckpointManager:
    model, opt = tiny(width)
    return CheckpointManager(CheckpointConfig(dir=str(d), **kw), model, opt)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ------------------------------------------------------------------------------ job lock

SAVER = textwrap.dedent(
    """
    import sys, time, torch, torch.nn as nn
    from kempnerforge.checkpoint import CheckpointManager
    from kempnerforge.config import CheckpointConfig
    m = nn.Linear(4, 2)
    mgr = CheckpointManager(CheckpointConfig(dir=sys.argv[1]), m, torch.optim.AdamW(m.parameters()))
    if sys.argv[2] == "load":
        print("LOADED", mgr.load()[0], flush=True)
        sys.exit(0)
    mgr.save(int(sys.argv[3]))
    print("SAVED", flush=True)
    if sys.argv[2] == "hold":
        time.sleep(600)
    """
)


def _env(run_id: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["KEMPNERFORGE_JOB_ID"] = run_id
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_saver(d: Path, mode: str, step: int, run_id: str) -> subprocess.CompletedProcess:
    """One SAVER process to completion, as job ``run_id``."""
    return subprocess.run(
        [sys.executable, "-c", SAVER, str(d), mode, str(step)],
        capture_output=True,
        text=True,
        env=_env(run_id),
        timeout=120,
    )


def test_second_job_refused_reader_unaffected_killed_holder_released(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    holder = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(d), "hold", "5"],
        stdout=subprocess.PIPE,
        text=True,
        env=_env("job-one"),
    )
    try:
        assert holder.stdout.readline().strip() == "SAVED"
        second = _run_saver(d, "once", 6, "job-two")
        assert second.returncode != 0
        assert "CheckpointDirLockedError" in second.stderr and "job 'job-one'" in second.stderr
        assert f"pid {holder.pid}" in second.stderr
        assert os.readlink(d / "latest") == "step_5" and not (d / "step_6").exists()
        reader = _run_saver(d, "load", 0, "job-three")
        assert reader.returncode == 0 and "LOADED 5" in reader.stdout, reader.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    again = _run_saver(d, "once", 7, "job-four")
    assert again.returncode == 0, again.stderr  # the SIGKILLed holder did not lock it forever
    assert os.readlink(d / "latest") == "step_7"


def test_managers_of_one_process_share_the_lock(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    a, b = manager(d), manager(d)
    a.save(1)
    b.save(2)  # same job: not refused
    a.save(3)
    assert read_holder(d).pid == os.getpid()
    a.close()
    b.close()
    assert read_holder(d) is None  # released with the last manager


def test_load_only_manager_takes_no_lock(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    w = manager(d)
    w.save(1)
    w.close()
    r = manager(d)
    assert r.load()[0] == 1
    assert read_holder(d) is None


# ------------------------------------------------------------------------------ hostile inputs


def test_planted_pickle_in_dcp_metadata_never_runs(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    mgr = manager(d, verify_on_load="none")
    mgr.save(1)
    marker = tmp_path / "pwned"
    (d / "step_1" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointFormatError) as ei:
        mgr.load(str(d / "step_1"))
    assert str(d / "step_1" / ".metadata") in str(ei.value)
    with pytest.raises(CheckpointFormatError):
        mgr.load()
    assert not marker.exists()


def test_planted_pickle_in_a_shard_never_runs(tmp_path: Path) -> None:
    """DCP's default planner would run it (weights_only=False for non-tensor values)."""
    d = tmp_path / "ckpt"
    mgr = manager(d, verify_on_load="none")
    mgr.save(1)
    marker = tmp_path / "pwned"
    sd = model_state_dict(mgr.model, mgr.optimizer)
    sd["optimizer"]["param_groups"][0]["lr"] = _Payload(marker)
    for f in (d / "step_1").glob("*.distcp"):
        f.unlink()
    dcp.save(sd, checkpoint_id=str(d / "step_1"))
    assert not marker.exists()
    with pytest.raises(CheckpointFormatError, match=r"optimizer\.param_groups\.0\.lr"):
        mgr.load(str(d / "step_1"))
    assert not marker.exists()


def test_checkpoint_of_another_model_names_keys_and_loads_nothing(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    manager(d, width=8).save(1)
    other = manager(d, width=16)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as ei:
        other.load()
    msg = str(ei.value)
    assert str(d / "step_1") in msg
    assert "model.0.weight: checkpoint (8, 4), this model (16, 4)" in msg
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())
    assert os.readlink(d / "latest") == "step_1"  # nothing committed was touched


def test_corrupt_metadata_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "ckpt"
    mgr = manager(d)
    mgr.save(1)
    mgr.save(2)
    meta = d / "step_2" / "metadata.json"
    meta.write_text("{ not json")
    with caplog.at_level(logging.WARNING):
        assert mgr.load()[0] == 1  # auto-resume: previous good one, with a warning
    assert str(meta) in caplog.text
    with pytest.raises(FileNotFoundError) as ei:
        mgr.load(str(d / "step_2"))  # explicit: an error naming the file
    assert str(meta) in str(ei.value) and "JSON" in str(ei.value)


def test_missing_train_state_names_the_file(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    mgr = manager(d, verify_on_load="none")
    mgr.save(1)
    ts = d / "step_1" / storage.train_state_name(0)
    ts.unlink()
    with pytest.raises(FileNotFoundError) as ei:
        mgr.load()
    assert str(ts) in str(ei.value)


def test_latest_pointing_outside_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "ckpt"
    mgr = manager(d)
    mgr.save(1)
    mgr.save(2)
    elsewhere = tmp_path / "elsewhere"
    manager(elsewhere).save(9)
    (d / "latest").unlink()
    os.symlink(os.path.relpath(elsewhere / "step_9", d), d / "latest")
    with caplog.at_level(logging.WARNING):
        assert mgr.load()[0] == 2
    assert "refused" in caplog.text and "latest" in caplog.text


def test_unsafe_dir_refused_for_save_warned_for_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "ckpt"
    mgr = manager(d)
    mgr.save(1)
    os.chmod(d, 0o777)
    with pytest.raises(UnsafeCheckpointDirError, match="writable by every user"):
        mgr.save(2)
    assert os.readlink(d / "latest") == "step_1" and not (d / "step_2").exists()
    with caplog.at_level(logging.WARNING):
        assert manager(d).load()[0] == 1
    assert "writable by every user" in caplog.text
