"""A real SLURM cluster for the tests: slurm/dev-cluster/start.sh, once per session.

The cluster is the project's own one-host dev cluster (munged, slurmctld, slurmd n1..n4 on
loopback). Tests that need it skip only when it cannot be started here: not root, or neither the
SLURM daemons nor apt-get to install them. A cluster that was already running is reused and left
running; one that this session started is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from _slurm_tools import JOB_PREFIX, REPO, reference_losses

START = REPO / "slurm" / "dev-cluster" / "start.sh"
STOP = REPO / "slurm" / "dev-cluster" / "stop.sh"


@dataclass
class Cluster:
    conf: str
    state_dir: Path


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the SLURM dev cluster needs root (slurmd runs the jobs; apt installs SLURM)"
    have = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have and shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    return None


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def _cancel_test_jobs() -> None:
    res = subprocess.run(
        ["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=30
    )
    ids = [
        ln.split()[0]
        for ln in res.stdout.splitlines()
        if ln.split()[1:2] and ln.split()[1].startswith(JOB_PREFIX)
    ]
    if ids:
        subprocess.run(["scancel", "--full", *ids], capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    state_dir = Path(os.environ.get("KF_SLURM_DEV_DIR") or REPO / ".slurm-dev")
    was_running = _alive(state_dir / "run" / "slurmctld.pid")
    res = subprocess.run([str(START), "--quiet"], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.fail(f"slurm/dev-cluster/start.sh failed ({res.returncode}):\n{res.stderr}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("export SLURM_CONF=")][-1]
    conf = line.split("=", 1)[1]
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    _cancel_test_jobs()
    try:
        yield Cluster(conf, state_dir)
    finally:
        _cancel_test_jobs()
        if not was_running:
            subprocess.run([str(STOP)], capture_output=True, timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[int, float]:
    """Losses of the uninterrupted tiny job (2 ranks, local launcher), by step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return reference_losses(out)
