"""Running ``examples/own_loop.py`` under the local launcher from a test, and reading its run.

The example writes, on rank 0, one JSON line per optimizer step to ``losses.jsonl`` (appended
across restarts: ``step``, ``loss``, ``dt`` seconds since the previous step of the same process,
``pid``) and ``final.pt`` at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "own_loop.py"
SUBMIT = REPO / "launch" / "submit.py"


def env() -> dict[str, str]:
    """This environment without any job's identity, one thread per rank."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "KEMPNERFORGE_"))}
    out["OMP_NUM_THREADS"] = "1"
    return out


def rows(out: Path) -> list[dict]:
    """Every complete line of ``losses.jsonl``, in order (a torn last line is left out)."""
    path = out / "losses.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def losses(out: Path) -> dict[int, list[float]]:
    """Step -> every loss logged for it (a step redone after a crash has several)."""
    got: dict[int, list[float]] = {}
    for r in rows(out):
        got.setdefault(r["step"], []).append(r["loss"])
    return got


def local_launch(
    out: Path, nproc: int, example_args: list[str] = (), launcher_args: list[str] = ()
) -> subprocess.Popen[str]:
    """Start the example under ``launch/submit.py --local`` (output merged, as text)."""
    cmd = [sys.executable, str(SUBMIT), "--local", "--tasks-per-node", str(nproc)]
    cmd += [*launcher_args, "--", sys.executable, str(EXAMPLE), "--out", str(out), *example_args]
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )


def assert_same_final(got: Path, ref: Path, steps: int) -> None:
    """The final weights, BatchNorm buffers, optimizer moments, EMA, scaler and counters of
    ``got`` equal ``ref``'s bit for bit."""
    fa = torch.load(ref / "final.pt", weights_only=True)
    fb = torch.load(got / "final.pt", weights_only=True)
    assert fa["step"] == fb["step"] == steps
    for part in ("model", "ema"):
        for k, v in fa[part].items():
            assert torch.equal(v, fb[part][k]), f"{part}.{k}"
    for k, v in fa["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, fb["optimizer"]["state"][k][name]), f"optimizer {k}.{name}"
    assert fa["scaler"] == fb["scaler"]
    assert fa["counters"] == fb["counters"]
