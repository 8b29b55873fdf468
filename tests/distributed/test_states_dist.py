"""Handed-over states on 2 gloo ranks: replicated tensors written once from rank 0, DTensors
written as shards (one launch, see ``workers/states_worker.py``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers.torchrun import check_scenario, torchrun

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "workers" / "states_worker.py"
Run = tuple[Path, subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("states")
    return out, torchrun(WORKER, ["replicated", "sharded"], out)


def test_replicated_state_written_once_from_rank0(run: Run) -> None:
    check_scenario(*run[:1], "replicated", run[1])


def test_dtensor_state_written_as_shards(run: Run) -> None:
    check_scenario(*run[:1], "sharded", run[1])
