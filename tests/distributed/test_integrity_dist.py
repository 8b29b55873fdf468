"""Exactness and integrity across ranks (torchrun, 2 ranks, gloo, CPU, real DCP files).

* Every rank agrees before the collective load: a rank that cannot see its train state makes
  every rank raise the same error, where it used to leave the others in the collective (a hang
  until the process group timed out).
* BatchNorm under DDP: the checkpoint holds rank 0's running statistics, so the resumed run
  continues bit for bit (losses, weights, buffers).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "workers" / "integrity_worker.py"


def _run(name: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [*cmd, str(WORKER), name, str(out)], env=env, capture_output=True, text=True, timeout=180
    )
    if not (out / f"{name}.ok").exists():
        errs = "\n".join(f.read_text() for f in sorted(out.glob(f"{name}.err.*")))
        pytest.fail(f"{name}:\n{errs or p.stdout[-3000:] + p.stderr[-4000:]}")


def test_a_rank_missing_its_train_state_makes_every_rank_raise(tmp_path: Path) -> None:
    _run("missing_train_state", tmp_path)


def test_a_rank_with_a_stale_view_makes_every_rank_raise_the_same_error(tmp_path: Path) -> None:
    """Before the agreement, rank 0 entered the collective load and waited there until the
    process group timed out (30 s here) while rank 1 raised alone."""
    _run("stale_view", tmp_path)


def test_ddp_batchnorm_buffers_resume_bit_exact(tmp_path: Path) -> None:
    _run("ddp_batchnorm", tmp_path)
