"""Crash safety: SIGKILL a real process at a chosen point of a save; the next load() restores
the previous committed step. The kill lands deterministically: the save pauses at the point
(test-only env hook) and drops a marker file, and only then does the test send SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kempnerforge.checkpoint import CheckpointManager
from kempnerforge.config import CheckpointConfig

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "workers" / "ckpt_crash_worker.py"


@pytest.mark.parametrize(
    ("mode", "point"),
    [
        ("async", "dcp_written"),
        ("disabled", "train_state_write"),
        ("async", "train_state_write"),
        ("async", "latest_swap"),
    ],
)
def test_sigkill_mid_save_restores_previous_step(tmp_path: Path, mode: str, point: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path), mode, point],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    marker = tmp_path / f"{point}.0"
    try:
        deadline = time.monotonic() + 150
        while not marker.exists():
            assert proc.poll() is None, (
                f"worker exited early:\n{proc.stdout.read() if proc.stdout else ''}"
            )
            assert time.monotonic() < deadline, "the save never reached the pause point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    torch.manual_seed(123)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "ckpt")), model, opt)
    assert mgr.peek_saved_step() == 1
    assert mgr.load() == (1, 10, {})
    ref = torch.load(tmp_path / "ref1.pt", weights_only=True)
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())
    # the interrupted save leaves nothing that blocks the next one
    mgr.save(2, tokens_seen=20)
    assert os.readlink(tmp_path / "ckpt" / "latest") == "step_2"
    assert mgr.load() == (2, 20, {})
