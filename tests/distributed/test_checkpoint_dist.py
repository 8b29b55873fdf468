"""Multi-process checkpoint tests: torchrun, gloo, CPU, FSDP2 (real DCP on disk).

Starting torchrun (and torch in every rank) costs more than any scenario, so the 2-rank scenarios
share one launch; each test then checks that its scenario's assertions held (``<name>.ok``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers.torchrun import check_scenario, torchrun

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "workers" / "ckpt_worker.py"
TWO_RANK = ["save", "async_train", "slow_rank0"]
Run = tuple[Path, subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("two_rank")
    return out, torchrun(WORKER, TWO_RANK, out)


def test_fsdp2_save_load_bit_exact(two_rank: Run) -> None:
    """Params and AdamW moments (local FSDP2 shards) equal bit for bit after save -> load."""
    out, proc = two_rank
    check_scenario(out, "save", proc)
    assert (out / "save" / "ckpt" / "step_3" / "train_state" / "rank_00001.pt").is_file()


def test_async_back_to_back_while_training(two_rank: Run) -> None:
    """Six async saves, one per step, while FSDP2 runs collectives: no deadlock, buffers reused,
    the last one loads bit-exact, retention kept two."""
    out, proc = two_rank
    check_scenario(out, "async_train", proc)


def test_slow_rank0_does_not_let_others_return_early(two_rank: Run) -> None:
    """Rank 0 sleeps 2 s in its train-state write; rank 1 still finds `latest` on the new step
    the moment its save() (sync) / wait() (async) returns."""
    out, proc = two_rank
    check_scenario(out, "slow_rank0", proc)


@pytest.mark.parametrize("nproc", [1, 3])
def test_reshard_from_2_ranks(two_rank: Run, nproc: int) -> None:
    """Saved on 2 ranks, loaded on 1 and 3 (uneven shards): full state bit-equal; RNG re-seeded
    deterministically and distinct per rank, with a warning."""
    out, proc = two_rank
    check_scenario(out, "save", proc)
    saved = out / "save"  # the "load" scenario runs in saved/load and reads saved/ckpt
    (saved / "load.ok").unlink(missing_ok=True)
    proc = torchrun(WORKER, ["load"], saved, nproc=nproc)
    check_scenario(saved, "load", proc)
    assert "re-seeded" in proc.stdout + proc.stderr
