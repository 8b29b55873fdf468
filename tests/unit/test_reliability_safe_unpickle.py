"""Restricted loading of DCP metadata and byte entries, and clear metadata.json errors.

Every "hostile" case plants a real pickle payload that would create a marker file if executed,
and asserts both the error (naming the file) and that the marker does not exist.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _reliability_fixtures import tiny_model, write_checkpoint
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from kempnerforge.checkpoint import storage
from kempnerforge.checkpoint.safe_unpickle import (
    CheckpointFormatError,
    SafeEmptyStateDictLoadPlanner,
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    load_dcp_metadata,
)


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: the test's proof of execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_real_metadata_loads_and_matches_pickle(tmp_path: Path) -> None:
    model, opt = tiny_model()
    step = write_checkpoint(tmp_path, 1, model, opt)
    md = load_dcp_metadata(step)
    with open(step / ".metadata", "rb") as f:
        ref = pickle.load(f)
    assert md.state_dict_metadata.keys() == ref.state_dict_metadata.keys()
    assert md.state_dict_metadata["model.0.weight"].size == torch.Size([6, 4])
    assert md.storage_data == ref.storage_data


def test_planted_pickle_in_dcp_metadata_never_runs(tmp_path: Path) -> None:
    model, opt = tiny_model()
    step = write_checkpoint(tmp_path, 1, model, opt)
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError) as ei:
        load_dcp_metadata(step)
    assert str(step / ".metadata") in str(ei.value) and "pathlib" in str(ei.value)
    sd = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()}}
    # through DCP's own load (which wraps reader errors in its own exception types)
    with pytest.raises(BaseException, match=r"refused to load 'pathlib\.Path\.touch'"):
        dcp.load(sd, storage_reader=SafeFileSystemReader(str(step)), planner=SafeLoadPlanner())
    assert not marker.exists()


def test_truncated_dcp_metadata_names_the_file(tmp_path: Path) -> None:
    model, opt = tiny_model()
    step = write_checkpoint(tmp_path, 1, model, opt)
    data = (step / ".metadata").read_bytes()
    (step / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match=r"\.metadata: DCP metadata is unreadable"):
        load_dcp_metadata(step)
    (step / ".metadata").unlink()
    with pytest.raises(CheckpointFormatError, match="incomplete"):
        load_dcp_metadata(step)


def test_planted_pickle_in_a_dcp_byte_entry_never_runs(tmp_path: Path) -> None:
    """DCP's own planner reads non-tensor values with weights_only=False; ours refuses."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ck"
    dcp.save({"extra": {"evil": _Payload(marker), "t": torch.ones(2)}}, checkpoint_id=str(ckpt))
    assert not marker.exists()
    # DCP wraps read errors in CheckpointException, a BaseException
    with pytest.raises(BaseException, match=r"'extra\.evil': refused non-tensor data"):
        _load_state_dict(
            {},
            storage_reader=SafeFileSystemReader(str(ckpt)),
            planner=SafeEmptyStateDictLoadPlanner(),
            no_dist=True,
        )
    assert not marker.exists()
    # and a legitimate non-tensor value (the optimizer's hyper-parameters) loads fine
    model, opt = tiny_model()
    step = write_checkpoint(tmp_path / "ok", 1, model, opt)
    sd: dict = {}
    _load_state_dict(
        sd,
        storage_reader=SafeFileSystemReader(str(step)),
        planner=SafeEmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    assert sd["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-2)
    assert torch.equal(sd["model"]["0.weight"], model.state_dict()["0.weight"])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "corrupt JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"tokens_seen": 3}), "missing key 'step'"),
        (json.dumps({"step": "7"}), "'step' must be an integer"),
    ],
)
def test_metadata_json_errors_name_the_file(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "metadata.json"
    f.write_text(content)
    with pytest.raises(CheckpointFormatError, match=match) as ei:
        storage.load_metadata(tmp_path)
    assert str(f) in str(ei.value)


def test_missing_metadata_json_says_not_committed(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="not committed") as ei:
        storage.load_metadata(tmp_path)
    assert str(tmp_path / "metadata.json") in str(ei.value)
    (tmp_path / "metadata.json").write_text(json.dumps({"step": 4, "tokens_seen": 8}))
    assert storage.load_metadata(tmp_path)["step"] == 4
