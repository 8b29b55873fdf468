"""The original KempnerForge's ``tests/distributed/test_checkpoint.py``, ported (torchrun).

Source: the stored version at commit 5ecbf29 (eight tests). The original ran under
``torchrun --nproc_per_node=4`` on CUDA with FSDP2; here 2 ranks, gloo, CPU, FSDP2, this
project's GPT (``workers/original_dist_worker.py``). Launching torchrun costs more than any
scenario, so seven scenarios share one launch; the divergent-``exists`` one runs in its own
launch with a short process-group timeout, because the failure it guards against is a hang.
Adapted: the original slowed rank 0's ``torch.save`` (``manager.torch.save``); ours is slowed
by the checkpoint module's test pause hook at the same place (rank 0's train-state write).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers.torchrun import check_scenario, torchrun

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "workers" / "original_dist_worker.py"
SHARED = [
    "save_load_fsdp",
    "resume_restores_optimizer_moments",
    "latest_symlink",
    "save_waits_for_rank0_writes",
    "latest_only_resolves_to_durable_checkpoints",
    "resume_falls_back_when_latest_incomplete",
    "back_to_back_async_saves_do_not_deadlock",
]
HANG_TIMEOUT_S = 5


def _launch(scenarios: list[str], out: Path, pg_timeout_s: int = 60) -> subprocess.CompletedProcess:
    return torchrun(WORKER, scenarios, out, env={"COMPAT_PG_TIMEOUT_S": str(pg_timeout_s)})


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("orig_dist")
    return out, _launch(SHARED, out)


@pytest.mark.parametrize("name", SHARED)
def test_scenario(shared_run, name: str) -> None:
    out, proc = shared_run
    check_scenario(out, name, proc)


def test_load_does_not_hang_on_divergent_exists(tmp_path: Path) -> None:
    name = "load_does_not_hang_on_divergent_exists"
    check_scenario(tmp_path, name, _launch([name], tmp_path, pg_timeout_s=HANG_TIMEOUT_S))
