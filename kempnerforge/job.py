"""Where this process sits in a job, from whichever launcher started it.

One class answers, for SLURM tasks, torchrun workers, our own local launcher and a plain
``python script.py``: rank, world size, local rank, node, master address and port, the job's
identity and how many times it has been restarted. Distributed setup, the checkpoint job lock,
the requeue guard and the launcher all read it from here, so each variable is interpreted in one
place. No torch import: the launcher uses it before any training code is loaded.

Precedence for the process's place: torchrun-style variables (``RANK``/``WORLD_SIZE``, which our
launcher also sets) win over SLURM's (``SLURM_PROCID``/``SLURM_NTASKS``), which win over a single
process. The job's identity: SLURM's job id (an array task is its own job), then
``KEMPNERFORGE_JOB_ID`` (set by our launcher or by whoever starts the run), then torchrun's run id,
then, for a torchrun worker without one, the agent's pid; otherwise the process is a run of its
own and gets an id that lives only in this process (never exported: children a process starts
later are other runs).
"""

from __future__ import annotations

import os
import re
import socket
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

JOB_ID_ENV = "KEMPNERFORGE_JOB_ID"
RESTART_COUNT_ENV = "KEMPNERFORGE_RESTART_COUNT"

_process_run_id: str | None = None


def _process_id() -> str:
    global _process_run_id
    if _process_run_id is None:
        _process_run_id = f"run:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return _process_run_id


def master_port_for(job_id: str, restart_count: int) -> int:
    """The rendezvous port of one run of a job: the same on every task, different across jobs
    and restarts (a restarted job may land on a node where the old port is still in TIME_WAIT),
    and below the usual ephemeral range."""
    return 15000 + zlib.crc32(f"{job_id}:{restart_count}".encode()) % 15000


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist: ``n[1-4]``, ``a,b``, ``gpu[01-03,07]``, ``r[1-2]-n[1-2]``.

    Zero padding of ranges is kept (``gpu[01-03]`` -> gpu01, gpu02, gpu03).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"bad SLURM nodelist {s!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"bad SLURM nodelist {s!r}: unbalanced '['")
    parts.append("".join(cur))
    return parts


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    prefix, body, rest = item[: m.start()], m.group(1), item[m.end() :]
    values: list[str] = []
    for rng in body.split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad SLURM nodelist range {rng!r} in {item!r}")
            width = len(lo)
            values.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        elif rng:
            values.append(rng)
    return [h for v in values for h in _expand_one(prefix + v + rest)]


def _int(env: Mapping[str, str], key: str, default: int = 0) -> int:
    raw = env.get(key)
    try:
        return int(raw) if raw not in (None, "") else default
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class JobEnvironment:
    """This process's place in its job. Build it with :meth:`from_env`.

    ``launcher``: ``"torchrun"`` (RANK/WORLD_SIZE set: torchrun, our launcher, or anything
    torchrun-compatible), ``"slurm"`` (srun tasks without those) or ``"single"``.
    ``job_id``: the scheduler's id under SLURM (what ``scontrol requeue`` takes), else the run's
    id. ``under_slurm``: the process runs inside a SLURM job (its id is SLURM's).
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    job_id: str
    under_slurm: bool
    restart_count: int
    hostname: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def run_identity(self) -> str:
        """The identity every process of this run shares (the checkpoint job lock's owner)."""
        return f"slurm:{self.job_id}" if self.under_slurm else self.job_id

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JobEnvironment:
        env = os.environ if env is None else env
        under_slurm = bool(env.get("SLURM_JOB_ID"))
        job_id = _job_id(env)
        restart = _restart_count(env)
        host = env.get("SLURMD_NODENAME") or socket.gethostname()
        if "RANK" in env and "WORLD_SIZE" in env:
            world = _int(env, "WORLD_SIZE", 1)
            local_world = _int(env, "LOCAL_WORLD_SIZE", world)
            return cls(
                launcher="torchrun",
                rank=_int(env, "RANK"),
                world_size=world,
                local_rank=_int(env, "LOCAL_RANK"),
                local_world_size=local_world,
                node_rank=_int(env, "GROUP_RANK", _int(env, "SLURM_NODEID")),
                num_nodes=max(1, world // max(1, local_world)),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=_int(env, "MASTER_PORT", 29500),
                job_id=job_id,
                under_slurm=under_slurm,
                restart_count=restart,
                hostname=host,
            )
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            ntasks = _int(env, "SLURM_NTASKS", 1)
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
            hosts = expand_nodelist(nodelist) if nodelist else []
            nnodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", len(hosts) or 1))
            local_world = _slurm_tasks_on_this_node(env, ntasks, nnodes)
            port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else None
            return cls(
                launcher="slurm",
                rank=_int(env, "SLURM_PROCID"),
                world_size=ntasks,
                local_rank=_int(env, "SLURM_LOCALID"),
                local_world_size=local_world,
                node_rank=_int(env, "SLURM_NODEID"),
                num_nodes=nnodes,
                master_addr=env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
                master_port=port if port is not None else master_port_for(job_id, restart),
                job_id=job_id,
                under_slurm=True,
                restart_count=restart,
                hostname=host,
            )
        return cls(
            launcher="single",
            rank=0,
            world_size=1,
            local_rank=0,
            local_world_size=1,
            node_rank=0,
            num_nodes=1,
            master_addr="127.0.0.1",
            master_port=0,
            job_id=job_id,
            under_slurm=under_slurm,
            restart_count=restart,
            hostname=host,
        )

    def torchrun_env(self) -> dict[str, str]:
        """The torchrun-compatible variables a task of this place gets (the launcher sets them)."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _job_id(env: Mapping[str, str]) -> str:
    slurm = env.get("SLURM_JOB_ID")
    if slurm:
        array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        if array_job and array_task:
            return f"{array_job}_{array_task}"
        return slurm
    own = env.get(JOB_ID_ENV)
    if own:
        return own
    elastic = env.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":
        return f"torchelastic:{elastic}"
    if "LOCAL_RANK" in env and "TORCHELASTIC_RUN_ID" in env:
        # torchrun --standalone without a run id: the workers of one agent share its pid
        return f"torchrun:{socket.gethostname()}:{os.getppid()}"
    return _process_id()


def _restart_count(env: Mapping[str, str]) -> int:
    for key in ("SLURM_RESTART_COUNT", RESTART_COUNT_ENV, "TORCHELASTIC_RESTART_COUNT"):
        if env.get(key):
            return _int(env, key)
    return 0


def _slurm_tasks_on_this_node(env: Mapping[str, str], ntasks: int, nnodes: int) -> int:
    """Tasks of this step on this node: SLURM_TASKS_PER_NODE is like ``2(x3),1``."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = _int(env, "SLURM_NODEID")
    if 0 <= node < len(counts):
        return counts[node]
    return max(1, ntasks // max(1, nnodes))
