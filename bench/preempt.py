"""Preemption: SIGUSR1 to process exit, with ``latest`` durable at the step the process stopped.

Two ways to measure it, both in a child process:

- ``entrypoint``: the real thing, ``python -m kempnerforge.train`` (its signal flag, step-boundary
  agreement, save, flush, wait, exit 75) on a model of the benchmark's size;
- ``worker``: ``bench/worker.py preempt``, the same sequence reduced to its bones (a fallback when
  the entrypoint is unavailable or broken; the JSON says which one ran).

Both wait until a periodic save has committed with reused buffers (steady state) and signal right
after, so no flush is in flight: the target budgets one step + one blocking + one flush + 2 s. A
signal that lands mid-flush costs up to one more flush (the docs say so).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from measure import remove

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
_STATS_RE = re.compile(
    r"checkpoint step=(\d+) bytes=(\d+) blocked=([\d.]+)s durable=([\d.]+)s rate=([\d.]+)GB/s"
)


def _parse_result(stdout: str) -> dict[str, Any] | None:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return None


def _latest_step(ckpt: Path) -> int | None:
    try:
        name = os.readlink(ckpt / "latest")
    except OSError:
        return None
    m = re.fullmatch(r"step_(\d+)", name)
    return int(m.group(1)) if m else None


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def via_entrypoint(
    size: dict[str, Any],
    device: str,
    root: Path,
    mode: str,
    batch: int,
    seq: int,
    interval: int,
    timeout: float,
) -> dict[str, Any]:
    """``python -m kempnerforge.train`` with the benchmark's model size; SIGUSR1 in steady state."""
    out_dir = root / "preempt_run"
    remove(out_dir)
    ckpt = out_dir / "checkpoints"
    heads = size.get("n_head") or max(1, size["d_model"] // 64)
    overrides = [
        f"output_dir={out_dir}",
        f"model.vocab_size={size['vocab']}",
        f"model.seq_len={seq}",
        f"model.n_layer={size['n_layer']}",
        f"model.n_head={heads}",
        f"model.d_model={size['d_model']}",
        f"model.compute_dtype={'bfloat16' if device == 'cuda' else 'float32'}",
        f"train.global_batch_size={batch}",
        f"train.micro_batch_size={batch}",
        "train.max_steps=1000000",
        "train.log_interval=1000000",
        f"data.synthetic_tokens={max(200_000, 64 * batch * (seq + 1))}",
        f"checkpoint.interval={interval}",
        f"checkpoint.async_mode={mode}",
        "checkpoint.keep_last_n=2",
        f"distributed.device={device}",
        "distributed.intra_op_threads=0" if device == "cuda" else "distributed.intra_op_threads=2",
        "resilience.requeue=false",
    ]
    cmd = [
        sys.executable,
        "-m",
        "kempnerforge.train",
        "--config",
        str(REPO / "configs" / "debug.yaml"),
        *overrides,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log_path = root / "preempt_train.log"
    res: dict[str, Any] = {
        "via": "entrypoint",
        "command": " ".join(cmd[1:]),
        "mode": mode,
        "interval": interval,
    }
    with open(log_path, "w") as log:
        t_launch = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        deadline = t_launch + timeout
        samples: list[tuple[float, int]] = []
        ready = False
        while time.time() < deadline and proc.poll() is None:
            now = time.time()
            done_steps = _count_lines(out_dir / "metrics.jsonl")
            samples.append((now, done_steps))
            latest = _latest_step(ckpt)
            # Steady state and nothing in flight: buffers were reused at least once and the
            # newest periodic save has committed. (If the interval is shorter than a flush this
            # never happens: then the loop is disk-bound anyway, and we time out and say so.)
            if (
                latest is not None
                and latest >= 2 * interval
                and latest == (done_steps // interval) * interval
            ):
                ready = True
                break
            time.sleep(0.01)
        if not ready:
            proc.kill()
            proc.wait()
            tail = log_path.read_text()[-2000:]
            return dict(
                res,
                error=f"training never reached a steady-state save (rc={proc.returncode}): {tail}",
            )
        t_sig = time.time()
        before = _latest_step(ckpt)
        proc.send_signal(signal.SIGUSR1)
        t_durable = None
        while proc.poll() is None and time.time() < deadline:
            now_latest = _latest_step(ckpt)
            if now_latest is not None and now_latest != before:
                t_durable = time.time()
                break
            time.sleep(0.005)
        try:
            rc = proc.wait(timeout=max(deadline - time.time(), 30))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return dict(res, error="training did not exit after SIGUSR1 in time")
        t_exit = time.time()
    text = log_path.read_text()
    res["log_tail"] = text[-1500:]
    # step time: metrics lines appear once per step; use the second half of the samples
    half = samples[len(samples) // 2 :]
    dl = half[-1][1] - half[0][1] if len(half) > 1 else 0
    step_s = (half[-1][0] - half[0][0]) / dl if dl > 0 else None
    final = _latest_step(ckpt)
    lines = (
        (out_dir / "metrics.jsonl").read_text().splitlines()
        if (out_dir / "metrics.jsonl").exists()
        else []
    )
    last_metric_step = json.loads(lines[-1])["step"] if lines else None
    saves = [
        {"step": int(m[1]), "bytes": int(m[2]), "blocked_s": float(m[3]), "durable_s": float(m[4])}
        for m in _STATS_RE.finditer(text)
    ]
    final_save = next((s for s in reversed(saves) if s["step"] == final), None)
    res.update(
        rc=rc,
        exit_code_ok=rc == 75,
        signal_to_exit_s=t_exit - t_sig,
        signal_to_durable_latest_s=(t_durable - t_sig) if t_durable else None,
        durable_to_exit_s=(t_exit - t_durable) if t_durable else None,
        step_s=step_s,
        final_step=final,
        last_metric_step=last_metric_step,
        latest=f"step_{final}" if final is not None else None,
        latest_ok=final is not None and final == last_metric_step,
        saves=saves[-4:],
        state_bytes_on_disk=final_save["bytes"] if final_save else None,
    )
    if final_save is not None:
        res["save_call_to_durable_s"] = final_save["durable_s"]
        res["save_blocked_s"] = final_save["blocked_s"]
    remove(out_dir)
    return res


def via_worker(
    size: dict[str, Any],
    device: str,
    root: Path,
    mode: str,
    batch: int,
    seq: int,
    interval: int,
    timeout: float,
) -> dict[str, Any]:
    """``bench/worker.py preempt``: the sequence without the training entrypoint around it."""
    ckpt = root / "preempt"
    remove(ckpt)
    spec = {
        "size": size,
        "device": device,
        "batch": batch,
        "seq": seq,
        "ckpt_dir": str(ckpt),
        "interval": interval,
        "async_mode": mode,
        "max_steps": 50 * interval,
    }
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(HERE / "worker.py"), "preempt", "--spec", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out: dict[str, Any] = {"via": "worker", "mode": mode, "interval": interval}
    try:
        assert proc.stdout is not None
        deadline = time.time() + timeout
        line = ""
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line or line.startswith("READY"):
                break
        if not line.startswith("READY"):
            proc.kill()
            _, err = proc.communicate()
            return dict(out, error=f"preempt worker never got ready: {err[-1500:]}")
        t_sig = time.time()
        proc.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=max(deadline - time.time(), 30))
        t_exit = time.time()
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return dict(out, error="preempt worker did not exit in time")
    res = _parse_result(stdout)
    out.update(
        rc=proc.returncode, signal_to_exit_s=t_exit - t_sig, exit_code_ok=proc.returncode == 75
    )
    if res is None:
        return dict(out, error=f"no RESULT from preempt worker: {stderr[-1500:]}")
    final = _latest_step(ckpt)
    out.update(
        step_s=res["step_s"],
        signal_to_save_call_s=res["t_save_call"] - t_sig,
        save_call_to_durable_s=res["t_durable"] - res["t_save_call"],
        durable_to_exit_s=t_exit - res["t_durable"],
        final_step=res["final_step"],
        latest=f"step_{final}" if final is not None else None,
        latest_ok=final == res["final_step"],
    )
    remove(ckpt)
    return out


def measure(
    via: str,
    size: dict[str, Any],
    device: str,
    root: Path,
    mode: str,
    batch: int,
    seq: int,
    interval: int,
    timeout: float,
) -> dict[str, Any]:
    """``via``: "entrypoint", "worker", or "auto" (the entrypoint, the worker if that failed)."""
    if via in ("entrypoint", "auto"):
        res = via_entrypoint(size, device, root, mode, batch, seq, interval, timeout)
        if via == "entrypoint" or "error" not in res:
            return res
        fallback = via_worker(size, device, root, mode, batch, seq, interval, timeout)
        fallback["entrypoint_error"] = res["error"]
        return fallback
    return via_worker(size, device, root, mode, batch, seq, interval, timeout)
