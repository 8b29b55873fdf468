"""One reader of launcher variables: SLURM tasks, torchrun-style workers, plain processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kempnerforge.job import (
    JobEnvironment,
    expand_nodelist,
    master_port_for,
)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("n[1-4]", ["n1", "n2", "n3", "n4"]),
        ("a,b", ["a", "b"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("x[1-2],y5,z[08-09]", ["x1", "x2", "y5", "z08", "z09"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("single", ["single"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_bad_nodelist_names_it() -> None:
    with pytest.raises(ValueError, match="nodelist"):
        expand_nodelist("n[1-")


SLURM_TASK = {
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NNODES": "2",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_RESTART_COUNT": "2",
}


def test_slurm_task() -> None:
    e = JobEnvironment.from_env(SLURM_TASK)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == (
        "slurm",
        3,
        4,
        1,
        2,
    )
    assert (e.node_rank, e.num_nodes, e.master_addr) == (1, 2, "gpu07")
    assert (e.job_id, e.under_slurm, e.restart_count, e.run_identity) == (
        "123456",
        True,
        2,
        "slurm:123456",
    )
    # the launcher's formula: every task of one run agrees, a restart moves the port
    assert e.master_port == master_port_for("123456", 2)
    assert master_port_for("123456", 2) != master_port_for("123456", 3)
    assert 15000 <= e.master_port < 30000
    assert JobEnvironment.from_env({**SLURM_TASK, "MASTER_PORT": "4242"}).master_port == 4242


def test_array_task_is_its_own_job() -> None:
    env = {**SLURM_TASK, "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "7"}
    assert JobEnvironment.from_env(env).job_id == "100_7"


def test_torchrun_style_wins_and_keeps_slurm_identity() -> None:
    env = {
        **SLURM_TASK,
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "9",
    }
    e = JobEnvironment.from_env(env)
    assert (e.launcher, e.rank, e.world_size, e.master_addr, e.master_port) == (
        "torchrun",
        1,
        2,
        "h",
        9,
    )
    assert (e.job_id, e.under_slurm, e.restart_count) == ("123456", True, 2)
    assert {k: e.torchrun_env()[k] for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")} == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_PORT": "9",
    }


def test_launcher_identity_and_restart_count() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "1", "KEMPNERFORGE_JOB_ID": "local-abc"}
    env["KEMPNERFORGE_RESTART_COUNT"] = "3"
    e = JobEnvironment.from_env(env)
    assert (e.job_id, e.under_slurm, e.restart_count, e.run_identity) == (
        "local-abc",
        False,
        3,
        "local-abc",
    )
    elastic = JobEnvironment.from_env({"TORCHELASTIC_RUN_ID": "xyz", "LOCAL_RANK": "0"})
    assert elastic.job_id == "torchelastic:xyz"


def test_plain_process_identity_is_stable_and_not_exported() -> None:
    a, b = JobEnvironment.from_env({}), JobEnvironment.from_env({})
    assert a.launcher == "single" and a.world_size == 1
    assert a.job_id == b.job_id and a.job_id.startswith("run:")
    assert "KEMPNERFORGE_JOB_ID" not in os.environ
    # another process is another run
    code = "from kempnerforge.job import JobEnvironment as J; print(J.from_env({}).job_id)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() != a.job_id


def test_bad_integer_names_the_variable() -> None:
    with pytest.raises(ValueError, match="SLURM_NTASKS"):
        JobEnvironment.from_env({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "x"})
