"""Starting a torchrun worker script from a test and reading what its scenarios reported.

A worker (see :mod:`helpers.dist_worker`) runs named scenarios and leaves ``OUT/<name>.ok`` when
one held on every rank, ``OUT/<name>.err.<rank>`` with the traceback where it did not. The
worker imports ``helpers`` too, so the child gets ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, one thread per rank, ``tests/`` first on ``PYTHONPATH``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    return env


def torchrun(
    worker: Path,
    scenarios: Sequence[str],
    out: Path,
    *,
    nproc: int = 2,
    timeout_s: float = 240,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``worker SCENARIO[,SCENARIO...] OUT`` on ``nproc`` local ranks (gloo, CPU)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(worker),
        ",".join(scenarios),
        str(out),
    ]
    return subprocess.run(
        cmd, env=child_env(env), capture_output=True, text=True, timeout=timeout_s
    )


def check_scenario(out: Path, name: str, proc: subprocess.CompletedProcess[str]) -> None:
    """Fail the test unless scenario ``name`` held on every rank; the message is each rank's
    traceback, or the launch's output when no rank got as far as writing one."""
    if (out / f"{name}.ok").exists():
        return
    errs = "\n".join(
        f"--- rank {p.suffix[1:]} ---\n{p.read_text()}" for p in sorted(out.glob(f"{name}.err.*"))
    )
    tail = proc.stdout[-3000:] + proc.stderr[-5000:]
    pytest.fail(f"{name} failed (exit {proc.returncode}):\n{errs or tail}")
