"""Helpers shared by the training-entrypoint tests: run the real entrypoint, read what it wrote.

Runs are real: ``python -m kempnerforge.train`` (or ``torchrun``) as subprocesses, real
signals, real checkpoints on disk under ``tmp_path``. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = REPO / "configs" / "debug.yaml"
# A model smaller than configs/debug.yaml, so each run costs ~1 s of compute on 2 cores.
TINY = [
    "model.n_layer=2",
    "model.d_model=32",
    "model.n_head=2",
    "model.seq_len=32",
    "train.global_batch_size=12",
    "data.synthetic_tokens=20000",
    "checkpoint.interval=4",
    "optim.warmup_steps=3",
    "--quiet",
]


def env() -> dict[str, str]:
    # A different OMP_NUM_THREADS must not matter: the run sets its own thread count.
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}


def train_cmd(out: Path, overrides: list[str], nproc: int = 0) -> list[str]:
    """``nproc == 0``: plain python; otherwise torchrun --standalone with nproc workers."""
    base = [sys.executable, "-m", "kempnerforge.train"]
    if nproc:
        base = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "kempnerforge.train",
        ]
    return [*base, "--config", str(DEBUG_CONFIG), f"output_dir={out}", *TINY, *overrides]


def run(
    out: Path, overrides: list[str], nproc: int = 0, timeout: float = 240, quiet: bool = True
) -> subprocess.CompletedProcess:
    cmd = train_cmd(out, overrides, nproc)
    if not quiet:
        cmd.remove("--quiet")
    return subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_inproc(out: Path, overrides: list[str]) -> int:
    """The same run inside this process (``kempnerforge.train.main``): saves the ~5 s of
    importing torch per run, and checks that bits do not depend on how the run was launched
    (a subprocess baseline must match in-process resumes exactly)."""
    from kempnerforge.train import main

    argv = train_cmd(out, overrides)[3:]  # drop "python -m kempnerforge.train"
    return main(argv)


def metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dedup_metrics(out: Path) -> list[dict[str, Any]]:
    """One line per step; steps logged twice (replayed after a SIGKILL) must agree exactly."""
    by_step: dict[int, dict[str, Any]] = {}
    for m in metrics(out):
        if m["step"] in by_step:
            assert by_step[m["step"]] == m, f"step {m['step']} logged twice with different values"
        by_step[m["step"]] = m
    return [by_step[s] for s in sorted(by_step)]


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ms = metrics(out)
        if ms and ms[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before step {step}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (torchrun's workers), from /proc."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # the task may have ended meanwhile
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def worker_pids(proc: subprocess.Popen, nproc: int) -> list[int]:
    """The processes that run the loop: the process itself, or torchrun's ``nproc`` workers."""
    if not nproc:
        return [proc.pid]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = children(proc.pid)
        if len(pids) == nproc:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"torchrun did not start {nproc} workers")


def signal_at(
    out: Path, overrides: list[str], step: int, sig: int = signal.SIGUSR1, nproc: int = 0
) -> tuple[int, str]:
    """Start a run, wait until metrics.jsonl shows ``step``, send ``sig`` to every worker.

    torchrun does not forward SIGUSR1 (it would die of it), so the signal goes to each worker,
    as docs/training.md tells users to do. Returns (exit code, output).
    """
    proc = subprocess.Popen(
        train_cmd(out, overrides, nproc),
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_step(out, step, proc)
        for pid in worker_pids(proc, nproc):
            os.kill(pid, sig)
        text, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, text


def saved_steps(out: Path) -> list[int]:
    ck = out / "checkpoints"
    return sorted(
        int(p.name.split("_")[1]) for p in ck.glob("step_*") if p.name.split("_")[1].isdigit()
    )


def latest_step(out: Path) -> int:
    return int(os.readlink(out / "checkpoints" / "latest").split("_")[-1])


def checkpoint_tensors(out: Path, step: int) -> dict[str, Any]:
    """Model and optimizer state of ``step_<step>`` as one flat dict of tensors (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = out / f"flat_{step}.pt"
    dcp_to_torch_save(str(out / "checkpoints" / f"step_{step}"), str(dst))
    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = obj

    walk("", torch.load(dst, weights_only=False))
    return flat


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            assert a[k] == b[k], f"{k}: {a[k]!r} != {b[k]!r}"
    assert any(k.startswith("model.") for k in a)
    assert any(k.startswith("optimizer.") for k in a)


def consumed_samples(out: Path) -> tuple[list[int], list[int]]:
    """(global sample numbers, dataset indices) consumed over the run, last record per step/rank."""
    per: dict[tuple[int, int], dict[str, Any]] = {}
    for f in sorted(out.glob("samples.rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            per[(rec["step"], rec["samples"][0])] = rec
    numbers = sorted(n for r in per.values() for n in r["samples"])
    indices = sorted(i for r in per.values() for i in r["indices"])
    return numbers, indices
