"""Model/optimizer mismatch and directory-safety guards, on real DCP checkpoints and real
ownership/permission bits (the test runs as root in CI containers, so "another user" is made
with chown; as a normal user that case is skipped)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch.nn as nn
from _reliability_fixtures import tiny_model, write_checkpoint
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from kempnerforge.checkpoint.guards import (
    CheckpointMismatchError,
    UnsafeCheckpointDirError,
    check_compatible,
    check_dir_safety,
)


def test_same_model_is_compatible(tmp_path: Path) -> None:
    model, opt = tiny_model()
    step = write_checkpoint(tmp_path, 1, model, opt)
    sd = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
    md = check_compatible(step, sd)
    assert "model.0.weight" in md.state_dict_metadata


def test_other_model_lists_every_difference(tmp_path: Path) -> None:
    model, opt = tiny_model(width=6)
    step = write_checkpoint(tmp_path, 1, model, opt)
    other, _ = tiny_model(width=8)  # same keys, other shapes
    with pytest.raises(CheckpointMismatchError) as ei:
        check_compatible(step, {"model": get_model_state_dict(other)})
    msg = str(ei.value)
    assert (
        "shape mismatches (3)" in msg
        and "model.0.weight: checkpoint (6, 4), this model (8, 4)" in msg
    )
    assert str(step) in msg
    deeper = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.Linear(3, 3))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"keys missing from the checkpoint \(2\): "
        r"model\.3\.weight; model\.3\.bias",
    ):
        check_compatible(step, {"model": get_model_state_dict(deeper)})
    shallower = nn.Sequential(nn.Linear(4, 6))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"checkpoint keys this model does not have "
        r"\(2\): model\.2\.bias; model\.2\.weight",
    ):
        check_compatible(step, {"model": get_model_state_dict(shallower)})


def test_private_dir_is_fine(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    check_dir_safety(d, for_write=True)
    check_dir_safety(tmp_path / "missing", for_write=True)  # created later by us: fine


def test_world_writable_refused_for_write_warned_for_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(UnsafeCheckpointDirError, match="writable by every user") as ei:
        check_dir_safety(d, for_write=True)
    assert str(d) in str(ei.value) and "chmod" in str(ei.value)
    with caplog.at_level(logging.WARNING):
        check_dir_safety(d, for_write=False)
    assert any("writable by every user" in r.getMessage() for r in caplog.records)
    check_dir_safety(d, for_write=True, dir_mode=0o777)  # the user asked for it


def test_group_writable_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    os.chmod(d, 0o770)
    with caplog.at_level(logging.WARNING):
        check_dir_safety(d, for_write=True)
    assert any("group-writable" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(os.getuid() != 0, reason="making a directory owned by another user needs root")
def test_dir_of_another_user_refused_for_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(UnsafeCheckpointDirError, match="owned by uid 65534"):
        check_dir_safety(d, for_write=True)
    with caplog.at_level(logging.WARNING):
        check_dir_safety(d, for_write=False)
    assert any("owned by uid 65534" in r.getMessage() for r in caplog.records)
