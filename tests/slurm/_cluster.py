"""The dev cluster of a test session: slurm/dev-cluster/start.sh once per process.

Once per process, not per fixture: tests/examples loads tests/slurm/conftest.py a second time
(as its own module), and a second start must neither cancel the jobs of cases still running
nor stop a cluster the first one started. A cluster that was already running is reused and left
running; one that this session started is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from _slurm_tools import ISOLATED, JOB_PREFIX, REPO

START = REPO / "slurm" / "dev-cluster" / "start.sh"
STOP = REPO / "slurm" / "dev-cluster" / "stop.sh"


@dataclass
class Cluster:
    conf: str
    state_dir: Path
    started_here: bool
    old_conf: str | None

    def isolated_pairs(self) -> list[tuple[str, str]]:
        """The nodes of partition ``isolated``, two by two (each pair: one case at a time)."""
        res = subprocess.run(
            ["sinfo", "-h", "-N", "-p", ISOLATED, "-o", "%N"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        nodes = sorted(set(res.stdout.split()), key=lambda n: int(n.lstrip("n") or 0))
        if res.returncode != 0 or len(nodes) < 2:
            raise RuntimeError(
                f"the dev cluster has no partition {ISOLATED!r} of two nodes or more "
                f"({res.stdout.strip()} {res.stderr.strip()}): a cluster started by an older "
                "slurm/dev-cluster/start.sh is running; stop it with slurm/dev-cluster/stop.sh"
            )
        return [(nodes[i], nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]


_CLUSTER: Cluster | None = None


def why_not() -> str | None:
    """Why the dev cluster cannot be started here (None: it can)."""
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


def cancel_test_jobs() -> None:
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


def start() -> Cluster:
    """The running dev cluster (started on the first call); raises RuntimeError if it fails."""
    global _CLUSTER
    if _CLUSTER is not None:
        return _CLUSTER
    state_dir = Path(os.environ.get("KF_SLURM_DEV_DIR") or REPO / ".slurm-dev")
    was_running = _alive(state_dir / "run" / "slurmctld.pid")
    res = subprocess.run([str(START), "--quiet"], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"slurm/dev-cluster/start.sh failed ({res.returncode}):\n{res.stderr}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("export SLURM_CONF=")][-1]
    conf = line.split("=", 1)[1]
    _CLUSTER = Cluster(conf, state_dir, not was_running, os.environ.get("SLURM_CONF"))
    os.environ["SLURM_CONF"] = conf
    cancel_test_jobs()
    return _CLUSTER


def stop() -> None:
    """Cancel the test jobs; stop the cluster if this process started it."""
    global _CLUSTER
    if _CLUSTER is None:
        return
    cluster, _CLUSTER = _CLUSTER, None
    cancel_test_jobs()
    if cluster.started_here:
        subprocess.run([str(STOP)], capture_output=True, timeout=120)
    if cluster.old_conf is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = cluster.old_conf
