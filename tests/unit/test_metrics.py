"""TensorBoard and W&B metrics that survive requeues (kempnerforge/metrics.py, the trainer's use).

Real runs of ``python -m kempnerforge.train`` stopped by a real SIGUSR1 and a real SIGKILL, then
restarted with the same command; the event files are read with TensorBoard's own reader and the
W&B offline files (``.wandb``) record by record. W&B never reaches a network: offline mode, or
an online mode pointed at a closed port of this machine.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
import train_harness as h

from kempnerforge.config import ConfigError, load_config
from kempnerforge.metrics import MetricsLogger, stable_run_id, wandb_id

ea = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is a dev dependency (pip install -e '.[dev]')",
)
from tensorboard.backend.event_processing import event_file_loader  # noqa: E402

N = 60  # checkpoints every 4 steps (train_harness.TINY)
# configs/debug.yaml's own model and batch (the harness's is smaller): steps slow enough that
# W&B's start (a few seconds on a busy machine) comes well before the run's end.
DEBUG_SIZE = [
    "model.d_model=128",
    "model.seq_len=64",
    "train.global_batch_size=16",
    "data.synthetic_tokens=200000",
]
OFF_WARNING = "metrics: W&B logging is off"


def wandb_env(tmp: Path) -> dict[str, str]:
    """W&B's own config and cache under the test's directory, not the user's home; no system
    monitor or machine metadata (on 2 cores they take CPU from the training they watch)."""
    return {
        **h.env(),
        "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp / "wandb-data"),
        "WANDB_X_DISABLE_STATS": "true",
        "WANDB_X_DISABLE_META": "true",
    }


def run(out: Path, overrides: list[str], env: dict[str, str], quiet: bool = True) -> Any:
    cmd = h.train_cmd(out, overrides)
    if not quiet:
        cmd.remove("--quiet")
    return subprocess.run(cmd, env=env, cwd=h.REPO, capture_output=True, text=True, timeout=300)


def wait_for(cond: Any, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"run ended (rc={proc.returncode})"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --------------------------------------------------------------------------- readers


def tb_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` as TensorBoard shows them (its reader applies the purges)."""
    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def tb_raw_steps(log_dir: Path, tag: str) -> list[int]:
    """Every step at which ``tag`` was written, in every event file, nothing purged."""
    steps = []
    for f in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in event_file_loader.EventFileLoader(str(f)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B transaction log: a 7-byte header (``:W&B``, magic, version), then
    LevelDB-log records in 32 KiB blocks (7-byte header: crc32c, length, type 1 full / 2 first /
    3 middle / 4 last), each a ``wandb_internal_pb2.Record``. A torn tail is ignored."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, parts, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        if kind == 0 or len(chunk) < length:
            break
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            out.append(parts + chunk)
    records = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        records.append(r)
    return records


def wandb_runs(out: Path, live: bool = False) -> list[dict[str, Any]]:
    """One entry per offline run directory: its id (name, file, run record) and history rows.
    ``live``: a run still starting may have its directory and not yet its file."""
    runs = []
    for d in sorted((out / "wandb").glob("offline-run-*")):
        files = list(d.glob("run-*.wandb"))
        if live and not files:
            continue
        assert len(files) == 1, f"{d}: {files}"
        records = wandb_records(files[0])
        rows = []
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {
                    "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                    for i in r.history.item
                }
                rows.append(items)
        run_ids = [r.run.run_id for r in records if r.WhichOneof("record_type") == "run"]
        runs.append(
            {
                "dir_id": d.name.rsplit("-", 1)[-1],
                "file_id": files[0].stem.removeprefix("run-"),
                "record_ids": run_ids,
                "rows": rows,
            }
        )
    return runs


def wandb_losses(out: Path, live: bool = False) -> dict[int, list[float]]:
    steps: dict[int, list[float]] = {}
    for r in wandb_runs(out, live):
        for row in r["rows"]:
            if "loss" in row:
                steps.setdefault(int(row["step"]), []).append(row["loss"])
    return steps


# --------------------------------------------------------------------------- the trainer


def test_sigusr1_and_sigkill_restarts_log_every_step_once(tmp_path: Path) -> None:
    """SIGUSR1 (a clean stop through os._exit), then SIGKILL at a random moment, each followed by
    the same command: TensorBoard shows the loss of every step once, equal to metrics.jsonl's;
    every W&B offline run directory carries the job's one id; and at the kill, both had every
    step up to the last committed checkpoint on disk."""
    out, env = tmp_path / "run", wandb_env(tmp_path)
    over = [*DEBUG_SIZE, f"train.max_steps={N}", "logging.wandb=offline"]

    # 1. SIGUSR1: the stop save, then TensorBoard and W&B closed before os._exit.
    proc = subprocess.Popen(
        h.train_cmd(out, over), env=env, cwd=h.REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        # once W&B is up: a wandb.init still running at a stop is waited for 5 s only
        wait_for(lambda: wandb_losses(out, live=True), proc)
        proc.send_signal(signal.SIGUSR1)
        proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75
    stop = h.latest_step(out)
    assert [s for s, _ in tb_scalars(out / "tb", "loss")] == list(range(1, stop + 1))
    assert sorted(wandb_losses(out)) == list(range(1, stop + 1))  # run.finish() wrote every row

    # 2. SIGKILL at a random moment once W&B is up (until wandb.init returns, rows wait in
    # memory). SIGSTOP first freezes the trainer where it is; W&B's own service goes on and
    # flushes its file on its timer, which is what a commit can rely on.
    proc = subprocess.Popen(h.train_cmd(out, over), env=env, cwd=h.REPO, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: max(wandb_losses(out, live=True), default=0) > stop, proc)
        h.wait_for_step(out, max(wandb_losses(out, live=True)) + 5, proc)
        time.sleep(random.random() * 0.3)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    committed = h.latest_step(out)
    logged = h.metrics(out)[-1]["step"]
    assert stop < committed <= logged < N
    tb_steps = [s for s, _ in tb_scalars(out / "tb", "loss")]
    assert tb_steps == list(range(1, len(tb_steps) + 1)) and len(tb_steps) >= logged
    assert set(range(1, committed + 1)) <= set(wandb_losses(out))

    # 3. The same command to the end; the progress line shows the last save.
    p = run(out, over, env, quiet=False)
    assert p.returncode == 0, p.stderr[-3000:]
    line = re.search(
        r"step 60/60 \| loss [\d.]+ \| lr \S+ \| \d+ tok/s \| ETA \S+ \| (.*)", p.stderr
    )
    assert line, p.stderr[-3000:]
    assert re.match(r"last save step 56 \d+s ago, blocked [\d.]+s", line.group(1)), line[1]

    jsonl = {m["step"]: m["loss"] for m in h.dedup_metrics(out)}
    assert sorted(jsonl) == list(range(1, N + 1))
    tb = tb_scalars(out / "tb", "loss")
    assert [s for s, _ in tb] == list(range(1, N + 1))  # every step exactly once
    # TensorBoard stores float32: the same number as metrics.jsonl's, rounded once.
    assert all(v == struct.unpack("f", struct.pack("f", jsonl[s]))[0] for s, v in tb)
    # The files themselves hold the redone steps twice: the reader's purge hides the old ones.
    raw = tb_raw_steps(out / "tb", "loss")
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 3
    assert len(raw) == N + (logged - committed)
    for tag in ("lr", "grad_norm", "tokens_per_s", "step_time_s"):
        steps = [s for s, _ in tb_scalars(out / "tb", tag)]
        assert steps == list(range(1, N + 1)), tag
    assert all(v > 0 and math.isfinite(v) for _, v in tb_scalars(out / "tb", "grad_norm"))
    saves = {s for s, _ in tb_scalars(out / "tb", "save_blocked_s")}
    assert {stop, N} <= saves and saves <= set(h.saved_steps(out)) | set(range(4, N + 1, 4)) | {
        stop
    }

    # W&B: three runs of one job, one id everywhere; W&B keeps every value at full precision.
    job_id = wandb_id((out / "run_id").read_text().strip())
    runs = wandb_runs(out)
    assert len(runs) == 3
    for r in runs:
        assert r["dir_id"] == r["file_id"] == job_id and r["record_ids"] == [job_id]
    losses = wandb_losses(out)
    assert sorted(losses) == list(range(1, N + 1))
    assert all(v == jsonl[s] for s, vs in losses.items() for v in vs)


@pytest.mark.parametrize("failure", ["import", "unreachable"])
def test_wandb_failure_warns_once_and_training_goes_on(tmp_path: Path, failure: str) -> None:
    """W&B that cannot be imported, or an online W&B whose server does not answer (a closed port
    of this machine, so wandb.init retries until its timeout): one warning, the run finishes in
    the time a run without W&B takes, and TensorBoard and metrics.jsonl are complete."""
    env = wandb_env(tmp_path)
    steps = 12
    t0 = time.monotonic()
    base = run(tmp_path / "base", [f"train.max_steps={steps}"], env)
    base_s = time.monotonic() - t0
    assert base.returncode == 0, base.stderr[-3000:]

    if failure == "import":
        fake = tmp_path / "site" / "wandb"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('wandb is broken here')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(fake.parent), env.get("PYTHONPATH")]))
        mode = "offline"
    else:
        env.update({"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"})
        mode = "online"
    out = tmp_path / "run"
    t0 = time.monotonic()
    p = run(out, [f"train.max_steps={steps}", f"logging.wandb={mode}"], env)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count(OFF_WARNING) == 1, p.stderr[-3000:]
    assert ("wandb is broken here" in p.stderr) == (failure == "import")
    assert took < base_s + 20, f"{took:.1f}s with W&B failing, {base_s:.1f}s without"
    assert [m["step"] for m in h.metrics(out)] == list(range(1, steps + 1))
    assert [s for s, _ in tb_scalars(out / "tb", "loss")] == list(range(1, steps + 1))


# --------------------------------------------------------------------------- the public class


def test_logger_purges_steps_redone_after_a_restart(tmp_path: Path) -> None:
    """A user's own loop: steps 1-6 logged, a restart from step 3 logs 4-6 again with other
    values (within the same second: the second writer must still sort after the first)."""
    with MetricsLogger(tmp_path, resume_step=0, run_id="job-1") as m:
        for s in range(1, 7):
            m.log(s, loss=float(s))
        m.flush()
    with MetricsLogger(tmp_path, resume_step=3, run_id="job-1") as m:
        for s in range(4, 7):
            m.log(s, loss=10.0 * s, skipped=None)
    assert tb_scalars(tmp_path / "tb", "loss") == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ]
    assert sorted(tb_raw_steps(tmp_path / "tb", "loss")) == [1, 2, 3, 4, 4, 5, 5, 6, 6]
    assert tb_scalars(tmp_path / "tb", "skipped") == []


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    m = MetricsLogger(tmp_path, resume_step=0, rank=1, wandb="offline")
    m.log(1, loss=1.0)
    m.flush()
    m.close()
    assert not m.active and list(tmp_path.iterdir()) == []


def test_stable_run_id_is_kept_and_made_once(tmp_path: Path) -> None:
    first = stable_run_id(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert stable_run_id(tmp_path) == first == (tmp_path / "run_id").read_text().strip()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "run_id").write_text("slurm:1234\n")  # chosen by the user
    assert stable_run_id(tmp_path / "mine") == "slurm:1234"
    assert wandb_id("slurm:1234") != "slurm:1234" and wandb_id("abc-1_2") == "abc-1_2"
    assert re.fullmatch(r"[0-9a-f]{16}", wandb_id("slurm:1234"))


def test_logging_section(tmp_path: Path) -> None:
    cfg = load_config(h.DEBUG_CONFIG, [f"output_dir={tmp_path}"])
    assert (cfg.logging.tensorboard, cfg.logging.wandb, cfg.logging.dir) == (
        True,
        "disabled",
        str(tmp_path),
    )
    cfg = load_config(h.DEBUG_CONFIG, ["logging.wandb=online", "logging.dir=/elsewhere"])
    assert (cfg.logging.wandb, cfg.logging.dir) == ("online", "/elsewhere")
    with pytest.raises(ConfigError, match=r"logging.wandb must be one of"):
        load_config(h.DEBUG_CONFIG, ["logging.wandb=cloud"])
    with pytest.raises(ConfigError, match=r"logging.tensorbord"):
        load_config(h.DEBUG_CONFIG, ["logging.tensorbord=false"])


def test_library_imports_and_runs_without_tensorboard_and_wandb(tmp_path: Path) -> None:
    """Neither package importable (``sys.modules[name] = None`` makes ``import`` fail): the
    trainer imports, and a logger asking for both warns for each and logs nothing."""
    code = f"""
import logging, sys
sys.modules["tensorboard"] = None
sys.modules["wandb"] = None
logging.basicConfig(level=logging.WARNING)
import kempnerforge.train
from kempnerforge.metrics import MetricsLogger
m = MetricsLogger({str(tmp_path)!r}, resume_step=0, run_id="x", wandb="offline")
m.log(1, loss=1.0)
m.flush()
m.close()
print("active", m.active)
"""
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=h.env()
    )
    assert p.returncode == 0, p.stderr
    assert "active False" in p.stdout
    assert p.stderr.count("TensorBoard logging is off") == 1, p.stderr
    assert p.stderr.count(OFF_WARNING) == 1, p.stderr
    assert not (tmp_path / "tb").exists()
