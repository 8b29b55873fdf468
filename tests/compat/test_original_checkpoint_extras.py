"""The original KempnerForge's ``tests/unit/test_checkpoint_extras.py``, ported to this API.

``load_train_state_extras(step_dir)`` is public in the original (``kempnerforge.checkpoint``,
from commit 66c9d31): it returns a checkpoint's ``extra`` keys without applying its RNG. It
reads ``train_state.pt``, so the checkpoints here are written in the original's layout. It is
imported inside each test so that its absence fails these five tests, not the whole module.

Adapted: the original's UID gate (``_load_train_state`` refusing a file another uid owns, before
unpickling) protected a full pickle. The property kept here is the one that gate existed for: a
planted ``__reduce__`` payload never runs and the read is refused.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from helpers.original_format import original_train_state, write_original_checkpoint


def _extras_reader():
    from kempnerforge.checkpoint import load_train_state_extras

    return load_train_state_extras


class _Payload:
    """Pickle-time side effect: if ``__reduce__`` runs, the marker file appears."""

    def __init__(self, marker: Path) -> None:
        self._marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self._marker}",))


def _write_train_state(ckpt_dir: Path, extra: dict | None = None) -> None:
    write_original_checkpoint(
        ckpt_dir.parent,
        int(ckpt_dir.name.split("_")[1]),
        None,
        None,
        train_state=original_train_state(step=7, tokens_seen=128, extra=extra),
        latest=None,
    )


class TestLoadTrainStateExtras:
    def test_returns_extras_and_strips_standard_keys(self, tmp_path: Path) -> None:
        _write_train_state(tmp_path / "step_7", extra={"wandb_run_id": "abc123", "phase_idx": 1})
        extras = _extras_reader()(tmp_path / "step_7")
        assert extras == {"wandb_run_id": "abc123", "phase_idx": 1}

    def test_no_extras_returns_empty(self, tmp_path: Path) -> None:
        _write_train_state(tmp_path / "step_7")
        assert _extras_reader()(tmp_path / "step_7") == {}

    def test_missing_train_state_returns_empty(self, tmp_path: Path) -> None:
        (tmp_path / "step_7").mkdir()
        assert _extras_reader()(tmp_path / "step_7") == {}

    def test_does_not_touch_global_rng(self, tmp_path: Path) -> None:
        """The saved RNG state is ignored, not applied (restore_train_state applies it)."""
        _write_train_state(tmp_path / "step_7", extra={"wandb_run_id": "abc"})
        random.seed(1234)
        before_python = random.getstate()
        before_torch = torch.random.get_rng_state()
        _extras_reader()(tmp_path / "step_7")
        assert random.getstate() == before_python
        assert torch.equal(torch.random.get_rng_state(), before_torch)

    def test_foreign_owned_file_raises_before_unpickling(self, tmp_path: Path) -> None:
        ckpt_dir = tmp_path / "step_42"
        marker = tmp_path / "rce_marker"
        payload = {"step": 42, "tokens_seen": 0, "rng": {}, "payload": _Payload(marker)}
        write_original_checkpoint(tmp_path, 42, None, None, train_state=payload, latest=None)
        reader = _extras_reader()
        with pytest.raises(Exception):  # noqa: B017 - refused, whatever the error class
            reader(ckpt_dir)
        assert not marker.exists(), "payload fired while reading the extras"
