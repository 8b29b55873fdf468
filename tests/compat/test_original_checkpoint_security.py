"""The original KempnerForge's ``tests/unit/test_checkpoint_security.py``, ported to this API.

The original loaded ``train_state.pt`` as a full pickle and guarded it with a UID check
(``_load_train_state``: refuse files another uid owns, warn when group/world-writable). Here no
checkpoint file is ever unpickled with arbitrary globals, so the tests keep the property and the
warning, not the mechanism:

* ``_load_train_state`` is internal and does not exist here: its tests go through
  ``CheckpointManager.load`` on checkpoints in the original's layout (``train_state.pt``).
* "foreign owned" is simulated as in the original, by making ``os.getuid`` return another uid
  (here in ``kempnerforge.checkpoint.guards``, where ownership is checked).
* The writability warning is about the checkpoint *directory* here (``check_dir_safety``), the
  original's was about the file; the message both contain is "group".
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from _compat_common import captured_logs, messages
from helpers.original_format import write_original_checkpoint

from kempnerforge.checkpoint import CheckpointManager
from kempnerforge.config import CheckpointConfig


class _Payload:
    """Pickle-time side effect: if ``__reduce__`` runs, the marker file appears."""

    def __init__(self, marker: Path) -> None:
        self._marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self._marker}",))


def _model_and_opt() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 4)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _malicious_checkpoint(root: Path, marker: Path, step: int = 42) -> Path:
    """A complete original-layout step whose train_state.pt runs a command when unpickled."""
    model, opt = _model_and_opt()
    payload = {"step": step, "tokens_seen": 1000, "rng": {}, "payload": _Payload(marker)}
    return write_original_checkpoint(root, step, model, opt, train_state=payload)


def _benign_checkpoint(root: Path, step: int = 7, tokens_seen: int = 128) -> Path:
    model, opt = _model_and_opt()
    ts = {"step": step, "tokens_seen": tokens_seen, "rng": {}}
    return write_original_checkpoint(root, step, model, opt, train_state=ts)


def _manager(root: Path) -> CheckpointManager:
    model, opt = _model_and_opt()
    return CheckpointManager(CheckpointConfig(dir=str(root)), model, opt)


class TestLoadTrainStateOwnershipGate:
    def test_rejects_foreign_owned_file(self, tmp_path: Path, monkeypatch) -> None:
        import kempnerforge.checkpoint.guards as guards

        marker = tmp_path / "rce_marker"
        ckpt_dir = _malicious_checkpoint(tmp_path, marker)
        real_uid = os.getuid()
        monkeypatch.setattr(guards.os, "getuid", lambda: real_uid + 12345)
        with pytest.raises(Exception):  # noqa: B017 - refused, whatever the error class
            _manager(tmp_path).load(path=str(ckpt_dir))
        assert not marker.exists(), "payload fired while loading a foreign-owned checkpoint"

    def test_accepts_own_file(self, tmp_path: Path) -> None:
        ckpt_dir = _benign_checkpoint(tmp_path)
        step, tokens, _ = _manager(tmp_path).load(path=str(ckpt_dir))
        assert step == 7
        assert tokens == 128

    def test_warns_on_group_writable(self, tmp_path: Path) -> None:
        ckpt_dir = _benign_checkpoint(tmp_path, step=1, tokens_seen=1)
        tmp_path.chmod(tmp_path.stat().st_mode | stat.S_IWGRP)
        with captured_logs() as records:
            _manager(tmp_path).load(path=str(ckpt_dir))
        assert any("group" in m and "writable" in m for m in messages(records)), (
            "expected a warning about a group-writable checkpoint"
        )

    def test_no_warning_on_private_mode(self, tmp_path: Path) -> None:
        ckpt_dir = _benign_checkpoint(tmp_path, step=1, tokens_seen=1)
        tmp_path.chmod(0o700)
        with captured_logs() as records:
            _manager(tmp_path).load(path=str(ckpt_dir))
        assert not any("group" in m and "writable" in m for m in messages(records))


class TestManagerLoadRejectsForeignCheckpoint:
    def test_load_raises_before_executing_pickle(self, tmp_path: Path, monkeypatch) -> None:
        """``load()`` (auto-resume through ``latest``, DCP excluded) never runs the payload."""
        import kempnerforge.checkpoint.guards as guards

        marker = tmp_path / "rce_marker_2"
        _malicious_checkpoint(tmp_path, marker)
        real_uid = os.getuid()
        mgr = _manager(tmp_path)
        monkeypatch.setattr(guards.os, "getuid", lambda: real_uid + 12345)
        with pytest.raises(Exception):  # noqa: B017 - refused, whatever the error class
            mgr.load(exclude_keys=["model", "optimizer"])
        assert not marker.exists(), "payload fired despite the check"
