"""Exactness and integrity across ranks (torchrun, 2 ranks, gloo, CPU, real DCP files).

* Every rank agrees before the collective load: a rank that cannot see its train state makes
  every rank raise the same error, where it used to leave the others in the collective (a hang
  until the process group timed out).
* BatchNorm under DDP: the checkpoint holds rank 0's running statistics, so the resumed run
  continues bit for bit (losses, weights, buffers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.torchrun import check_scenario, torchrun

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "workers" / "integrity_worker.py"


def _run(name: str, out: Path) -> None:
    check_scenario(out, name, torchrun(WORKER, [name], out, timeout_s=180))


def test_a_rank_missing_its_train_state_makes_every_rank_raise(tmp_path: Path) -> None:
    _run("missing_train_state", tmp_path)


def test_a_rank_with_a_stale_view_makes_every_rank_raise_the_same_error(tmp_path: Path) -> None:
    """Before the agreement, rank 0 entered the collective load and waited there until the
    process group timed out (30 s here) while rank 1 raised alone."""
    _run("stale_view", tmp_path)


def test_ddp_batchnorm_buffers_resume_bit_exact(tmp_path: Path) -> None:
    _run("ddp_batchnorm", tmp_path)
