"""The README's main command: preempt a real training job and prove the resume is bit-exact.

    python -m kempnerforge.demo            # or: make demo

1. Finds SLURM: a reachable cluster (``sinfo`` answers), else the project's one-host dev cluster
   (``slurm/dev-cluster/start.sh``; needs root and apt), else runs locally.
2. Trains the debug config once without interruption (2 ranks, local launcher): the reference.
3. Submits the same job with ``python -m kempnerforge.launch --nodes 2`` (locally:
   ``--local``), sends it SIGUSR1 mid-run, and follows it as it saves, requeues itself and
   resumes.
4. Prints one verdict line, ``resumed at step S, bit-exact with the uninterrupted run: yes``, and
   writes a PNG of both loss curves with the preemption marked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "kempnerforge.launch"]
START = REPO / "slurm" / "dev-cluster" / "start.sh"
STOP = REPO / "slurm" / "dev-cluster" / "stop.sh"


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _sinfo_ok(env: dict[str, str]) -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        res = subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def find_slurm(allow_dev_cluster: bool) -> str | None:
    """'cluster', 'dev-cluster' or None (local); sets SLURM_CONF for a started dev cluster."""
    if _sinfo_ok(_env()):
        return "cluster"
    if not allow_dev_cluster or not START.is_file():
        return None
    if os.geteuid() != 0:
        say("no SLURM reachable and not root: the dev cluster cannot start; running locally")
        return None
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        say("no SLURM and no apt-get to install it: running locally")
        return None
    say("no SLURM reachable: starting the one-host dev cluster (slurm/dev-cluster/start.sh)")
    res = subprocess.run([str(START)], capture_output=True, text=True, timeout=600)
    sys.stderr.write(res.stderr)
    m = re.search(r"export SLURM_CONF=(\S+)", res.stdout)
    if res.returncode != 0 or not m:
        say("the dev cluster did not start: running locally")
        return None
    os.environ["SLURM_CONF"] = m.group(1)
    say(f"dev cluster up; SLURM_CONF={m.group(1)}")
    return "dev-cluster"


def read_metrics(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(ln) for ln in lines if ln.strip().endswith("}")]


def wait_steps(path: Path, n: int, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while len(read_metrics(path)) < n:
        if time.monotonic() > deadline or not alive():
            raise SystemExit(f"[demo] the job did not reach step {n} (see its log)")
        time.sleep(0.1)


def _local_cmd(args: argparse.Namespace, out: Path) -> list[str]:
    """The demo job under the local launcher: 2 ranks on this machine."""
    return [
        *LAUNCH, "--local", "--nodes", "1", "--tasks-per-node", "2", "--config", args.config,
        f"output_dir={out}", f"train.max_steps={args.steps}",
    ]  # fmt: skip


def run_reference(args: argparse.Namespace, out: Path) -> None:
    say(f"1/3 uninterrupted reference run: {args.steps} steps, 2 ranks -> {out}")
    res = subprocess.run(_local_cmd(args, out), env=_env(), capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-4000:])
        raise SystemExit(f"[demo] the reference run failed ({res.returncode})")


def run_preempted_slurm(args: argparse.Namespace, out: Path) -> None:
    say(f"2/3 submitting the same job to SLURM: python -m kempnerforge.launch --nodes 2 -> {out}")
    cmd = [
        *LAUNCH,
        "--slurm",
        "--nodes",
        "2",
        "--job-name",
        "kf-demo",
        "--config",
        args.config,
        f"output_dir={out}",
        f"train.max_steps={args.steps}",
    ]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    print(res.stdout, end="")
    m = re.search(r"Submitted job (\d+)", res.stdout)
    if res.returncode != 0 or not m:
        sys.stderr.write(res.stderr)
        raise SystemExit("[demo] submission failed")
    job = m.group(1)
    metrics = out / "metrics.jsonl"
    wait_steps(metrics, args.preempt_after, 600)
    say(f"job {job} is at step {len(read_metrics(metrics))}: scancel --signal=USR1 {job}")
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=_env())
    seen = None
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        res = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=_env()
        )
        state = re.search(r"JobState=(\S+)", res.stdout)
        restarts = re.search(r"Restarts=(\d+)", res.stdout)
        now = (state.group(1) if state else "?", restarts.group(1) if restarts else "?")
        if now != seen:
            say(f"job {job}: {now[0]}, restart count {now[1]}")
            seen = now
        if now[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        time.sleep(0.5)
    if seen is None or seen[0] != "COMPLETED":
        raise SystemExit(
            f"[demo] job {job} ended {seen}; see python -m kempnerforge.launch --status {job}"
        )
    log = Path(out) / "slurm" / f"{job}_0_log.out"
    for line in log.read_text(errors="replace").splitlines():
        if re.search(r"restart \d+ rank 0/|kempnerforge stop|requeued job|resumed from step", line):
            say(f"  log | {line.strip()[:160]}")


def run_preempted_local(args: argparse.Namespace, out: Path) -> None:
    say(f"2/3 running the same job with the local launcher (no SLURM) -> {out}")
    proc = subprocess.Popen(
        _local_cmd(args, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    wait_steps(metrics, args.preempt_after, 600, alive=lambda: proc.poll() is None)
    say(f"at step {len(read_metrics(metrics))}: kill -USR1 {proc.pid} (the launcher passes it on)")
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate()
    for line in output.splitlines():
        if re.search(r"kempnerforge.launch|kempnerforge stop|resumed from step", line):
            say(f"  log | {line.strip()[:160]}")
    if proc.returncode != 0:
        raise SystemExit(f"[demo] the preempted run failed ({proc.returncode})")


def resume_step(out: Path) -> int | None:
    """The step the job stopped at and resumed from (the guard records each requeue)."""
    from kempnerforge.resilience.requeue import last_decision

    guard = last_decision(out / "checkpoints")
    steps = [h["step"] for h in guard.history if h.get("action") == "requeue"] if guard else []
    return steps[-1] if steps else None


def plot(ref: list[dict], got: list[dict], stop: int | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(
        [r["step"] for r in ref], [r["loss"] for r in ref], lw=4, alpha=0.35, label="uninterrupted"
    )
    ax.plot(
        [r["step"] for r in got],
        [r["loss"] for r in got],
        "k.",
        ms=4,
        label="preempted + requeued + resumed",
    )
    if stop is not None:
        ax.axvline(stop, color="tab:red", ls="--")
        ax.annotate(
            f"SIGUSR1: saved step {stop},\nrequeued, resumed",
            (stop, ax.get_ylim()[1]),
            xytext=(6, -30),
            textcoords="offset points",
            color="tab:red",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _leave_dev_cluster(keep: bool) -> None:
    """Stop the dev cluster this demo started (its six daemons), or say how to."""
    if keep:
        say(f"the dev cluster keeps running (--keep-cluster); stop it with: {STOP}")
        return
    res = subprocess.run([str(STOP)], capture_output=True, text=True, timeout=120)
    if res.returncode == 0:
        say("dev cluster stopped (the demo started it; --keep-cluster leaves it running)")
    else:
        say(f"stopping the dev cluster failed ({res.stderr.strip()[-200:]}); run: {STOP}")


def _print_report(checkpoints: Path) -> None:
    from kempnerforge import goodput

    try:
        print(goodput.text(goodput.report(checkpoints)), flush=True)
    except Exception as e:  # the verdict below matters more than the report
        say(f"no report ({e}); run: kempnerforge report {checkpoints}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kempnerforge.demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", default=str(REPO / "configs" / "debug.yaml"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--preempt-after", type=int, default=15, help="signal once this step is logged")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--local", action="store_true", help="skip SLURM even if it is reachable")
    p.add_argument("--no-dev-cluster", action="store_true", help="never start the dev cluster")
    p.add_argument(
        "--keep-cluster",
        action="store_true",
        help="leave a dev cluster the demo started running (it says how to stop it)",
    )
    args = p.parse_args(argv)
    if not 0 < args.preempt_after < args.steps - 2:
        p.error("--preempt-after must be between 1 and --steps - 3")
    out = Path(args.out).absolute()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    mode = None if args.local else find_slurm(not args.no_dev_cluster)
    say(f"mode: {mode or 'local (no SLURM)'}")
    t0 = time.time()
    try:
        run_reference(args, out / "reference")
        if mode:
            run_preempted_slurm(args, out / "preempted")
        else:
            run_preempted_local(args, out / "preempted")
    finally:
        if mode == "dev-cluster":
            _leave_dev_cluster(args.keep_cluster)
    ref = read_metrics(out / "reference" / "metrics.jsonl")
    got = read_metrics(out / "preempted" / "metrics.jsonl")
    want = {r["step"]: r["loss"] for r in ref}
    exact = (
        bool(got)
        and {r["step"] for r in got} == set(want)
        and all(r["loss"] == want[r["step"]] for r in got)
    )
    stop = resume_step(out / "preempted")
    png = out / "loss.png"
    where = "SLURM" if mode else "local launcher"
    say(f"3/3 comparing {len(got)} logged steps with the reference; plot -> {png}")
    plot(ref, got, stop, png, f"KempnerForge demo ({where}): bit-exact resume = {exact}")
    say(f"done in {time.time() - t0:.0f}s; what the preemption cost, from the run ledger:")
    _print_report(out / "preempted" / "checkpoints")
    print(
        f"resumed at step {stop if stop is not None else '?'}, bit-exact with the uninterrupted "
        f"run: {'yes' if exact else 'no'}",
        flush=True,
    )
    return 0 if exact and stop is not None else 1


if __name__ == "__main__":
    sys.exit(main())
