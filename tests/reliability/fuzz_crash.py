"""Crash-consistency fuzzer: SIGKILL a real training job at random moments, restart, compare.

One *trial* is one SIGKILL of a running ``python -m kempnerforge.train`` followed by a restart
of the same command. Trials are grouped into *campaigns*: a campaign is one training run (its
own output dir) killed several times and then allowed to finish; its per-step losses and its
final weights and AdamW moments are compared bit for bit with one uninterrupted reference run.

Where the kill lands (chosen per trial from a seeded RNG):

``random``      a uniform delay once training is under way (checkpoints every step, so kills
                land in steps, async flushes, commits, retention ... by chance);
``load``        during resume (just after the model is built, while it resolves and loads);
``dcp_written`` ``train_state_write`` ``pre_commit`` ``latest_swap`` ``retention``
                exactly inside that phase of the save protocol, through the checkpoint code's
                test-only pause hook (``KEMPNERFORGE_CKPT_TEST_PAUSE`` + a marker file: the
                process announces it is paused there, and is killed while it sleeps).

Each restart (re)starts with a random checkpoint mode (sync, async, async with pinned memory).

What is checked:

* every restart that reached its resume loaded, and from exactly the step ``latest`` pointed at
  when the previous process died ("no step lost beyond the last committed one"); a restart
  with no ``latest`` starts fresh;
* the finished run's ``metrics.jsonl``: every line of every step (re-done steps are logged
  again) has the reference's loss and learning rate bit for bit, and no step is missing;
* the final checkpoint's model and optimizer tensors equal the reference's bit for bit.

Usage::

    python tests/reliability/fuzz_crash.py --trials 20            # CI size
    python tests/reliability/fuzz_crash.py --trials 200 --seed 7  # the soak tier
    python tests/reliability/fuzz_crash.py --trials 20 --launcher exec --nproc 2  # torchrun

Exit code 0 when every check passed. A JSON summary goes to ``--json`` if given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "debug.yaml"

# A tiny model so a step and a save take milliseconds; dropout > 0 so RNG restore matters.
TINY = [
    "model.n_layer=2",
    "model.d_model=32",
    "model.n_head=2",
    "model.seq_len=16",
    "model.vocab_size=128",
    "model.dropout=0.1",
    "train.global_batch_size=4",
    "data.synthetic_tokens=20000",
    "optim.warmup_steps=2",
    "train.log_interval=1000",
    "checkpoint.interval=1",
    "checkpoint.keep_last_n=2",
]
MODES = ["disabled", "async", "async_with_pinned_mem"]
HOOK_POINTS = ["dcp_written", "train_state_write", "pre_commit", "latest_swap", "retention"]
# Weights of the kill plans: half land at random moments, the rest at named points.
PLANS = {"random": 8, "load": 2, **{p: 2 for p in HOOK_POINTS}}

PAUSE_ENV = "KEMPNERFORGE_CKPT_TEST_PAUSE"
PAUSE_MARKER_ENV = "KEMPNERFORGE_CKPT_TEST_PAUSE_MARKER"
RESUMED_RE = re.compile(r"resumed from step (\d+)")


@dataclass
class Restart:
    """One process of a campaign, from spawn to death."""

    index: int
    mode: str
    plan: str
    killed: bool = False
    exit_code: int | None = None
    expected_resume: int | None = None  # latest's step when the previous process died
    resumed: int | None = None  # what this process loaded (None: fresh or not reached)
    reached_training: bool = False
    latest_at_death: int | None = None
    outcome: str = ""  # "loaded" | "fresh" | "not reached" | "WRONG ..." | "completed"


@dataclass
class Campaign:
    index: int
    restarts: list[Restart] = field(default_factory=list)
    losses_equal: bool = False
    steps_complete: bool = False
    weights_equal: bool = False
    tensors_compared: int = 0
    leftover_tmp: int = 0
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(r.killed for r in self.restarts)

    @property
    def ok(self) -> bool:
        return (
            self.losses_equal
            and self.steps_complete
            and self.weights_equal
            and not self.errors
            and all(not r.outcome.startswith("WRONG") for r in self.restarts)
        )


# ---------------------------------------------------------------------------------------------
# Running the job


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "KEMPNERFORGE_"))
    }
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def _train_args(out: Path, mode: str, max_steps: int) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        f"output_dir={out}",
        f"train.max_steps={max_steps}",
        f"checkpoint.async_mode={mode}",
        *TINY,
    ]


class Launcher:
    """Starts ``python -m kempnerforge.train`` runs as real processes (``exec``: a fresh
    interpreter per run, exactly what a user types; torchrun when ``nproc > 1``)."""

    def __init__(self, nproc: int = 1):
        self.nproc = nproc

    def spawn(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> Any:
        if self.nproc > 1:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={self.nproc}",
                "-m",
                "kempnerforge.train",
                *args,
            ]
        else:
            cmd = [sys.executable, "-m", "kempnerforge.train", *args]
        with open(log, "ab") as fh:  # the child keeps its own descriptor
            return subprocess.Popen(
                cmd, stdout=fh, stderr=fh, env=_env(env), cwd=REPO, start_new_session=True
            )

    def close(self) -> None:
        pass


class _Forked:
    """A run forked by the zygote; the Popen methods the fuzzer uses."""

    def __init__(self, zygote: ForkLauncher, pid: int):
        self.zygote, self.pid, self.returncode = zygote, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.zygote._read_exit(self, block=False)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("kempnerforge.train (forked)", timeout or 0)
            self.zygote._read_exit(self, block=True, timeout=0.05)
        return self.returncode  # type: ignore[return-value]


class ForkLauncher(Launcher):
    """Forks each run from a zygote process that imported ``kempnerforge.train`` once.

    Each run is still a separate process (own pid and session, same ``main()`` as
    ``python -m kempnerforge.train``) that is SIGKILLed for real; only the ~2-10 s of
    interpreter start and ``import torch`` per restart are saved, which is what makes 20 trials
    fit a CI budget. The reference run always uses ``exec``, so every comparison also checks
    that the launch method does not change a bit.
    """

    def __init__(self) -> None:
        super().__init__(1)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_env(),
            cwd=REPO,
        )
        self._buf = b""

    def spawn(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> Any:
        req = {"args": args, "log": str(log), "env": _env(env), "cwd": str(REPO)}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        msg = self._line(block=True, timeout=300)
        if msg is None or "pid" not in msg:
            raise RuntimeError(f"zygote did not start a run: {msg!r}")
        return _Forked(self, msg["pid"])

    def _line(self, block: bool, timeout: float = 0.0) -> dict | None:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            wait = max(0.0, deadline - time.monotonic()) if block else 0.0
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the fuzzer's zygote process died")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _read_exit(self, run: _Forked, block: bool, timeout: float = 0.0) -> None:
        msg = self._line(block, timeout)
        if msg is not None:
            assert msg.get("exited") == run.pid, msg
            run.returncode = msg["code"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def zygote() -> None:
    """The fork server: import once, then fork one run per request line (one at a time)."""
    import kempnerforge.train as train_mod

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the run
            code = 1
            try:
                os.setsid()
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                os.environ.clear()
                os.environ.update(req["env"])
                os.chdir(req["cwd"])
                sys.argv = ["kempnerforge.train", *req["args"]]
                code = train_mod.main(req["args"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"exited": pid, "code": code}), flush=True)


def _descendants(pid: int) -> list[int]:
    """Every descendant pid of ``pid`` (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill(proc: Any) -> None:
    """SIGKILL the run and every process under it, at once (a node dying). torchrun starts each
    worker in its own session, so killing the launcher's process group is not enough."""
    tree = _descendants(proc.pid)
    for pid in [proc.pid, *tree]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in tree:  # reap-free wait: grandchildren are reaped by init; wait until gone
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)


def _metrics_lines(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def latest_step(ckdir: Path) -> int | None:
    """The step ``latest`` points at (None: no usable ``latest``), read like a resume would."""
    from kempnerforge.checkpoint import storage

    target, _why = storage.read_latest(ckdir)
    if target is None:
        return None
    meta, prob = storage.read_metadata(target)
    return None if prob else int(meta["step"])


# ---------------------------------------------------------------------------------------------
# Comparisons


def read_metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def final_tensors(ckdir: Path) -> dict[str, object]:
    """Model and optimizer tensors of the checkpoint ``latest`` points at, gathered in full."""
    from kempnerforge.checkpoint import storage
    from kempnerforge.cli import load_full_model_state

    target, why = storage.read_latest(ckdir)
    if target is None:
        raise RuntimeError(f"no final checkpoint in {ckdir}: {why}")
    out = {f"model.{k}": v for k, v in load_full_model_state(target, "model").items()}
    out.update({f"optimizer.{k}": v for k, v in load_full_model_state(target, "optimizer").items()})
    return out


@dataclass
class Reference:
    losses: dict[int, tuple[float, float]]  # step -> (loss, lr)
    tensors: dict[str, object]
    step_s: float  # seconds per training step, for the random kill window


def run_reference(work: Path, max_steps: int, nproc: int, timeout_s: float) -> Reference:
    """One uninterrupted run, always in a fresh interpreter (``exec``)."""
    out = work / "reference"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out / "run.log"
    t0 = time.monotonic()
    proc = Launcher(nproc).spawn(_train_args(out, "disabled", max_steps), log)
    t_first = None
    while proc.poll() is None:
        if t_first is None and _metrics_lines(out) > 0:
            t_first = time.monotonic()
        if time.monotonic() - t0 > timeout_s:
            _kill(proc)
            raise RuntimeError(f"reference run timed out; log: {log}")
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    rows = read_metrics(out)
    losses = {r["step"]: (r["loss"], r["lr"]) for r in rows}
    if sorted(losses) != list(range(1, max_steps + 1)) or len(rows) != max_steps:
        raise RuntimeError(f"reference metrics are not steps 1..{max_steps} once each")
    step_s = (time.monotonic() - (t_first or t0)) / max(max_steps - 1, 1)
    return Reference(losses, final_tensors(out / "checkpoints"), step_s)


# ---------------------------------------------------------------------------------------------
# One campaign


def _wait_for_kill_point(
    proc: Any,
    plan: str,
    out: Path,
    log: Path,
    markers: Path,
    rng: random.Random,
    ref: Reference,
    timeout_s: float,
) -> bool:
    """Wait until the plan's moment and SIGKILL; False when the process ended first."""
    deadline = time.monotonic() + timeout_s
    base = _metrics_lines(out)
    fire_at: float | None = None
    while proc.poll() is None:
        now = time.monotonic()
        if now > deadline:
            _kill(proc)
            raise RuntimeError(f"no kill point '{plan}' within {timeout_s:.0f}s; log: {log}")
        if plan == "random":
            if fire_at is None and _metrics_lines(out) > base:  # training is under way
                fire_at = now + rng.uniform(0, 4 * ref.step_s)
        elif plan == "load":
            if fire_at is None and b"model:" in log.read_bytes():
                fire_at = now + rng.uniform(0, 0.2)
        elif any(markers.iterdir()):
            fire_at = now
        if fire_at is not None and now >= fire_at:
            _kill(proc)
            return True
        time.sleep(0.005)
    return False


def run_campaign(
    index: int,
    work: Path,
    ref: Reference,
    kills: int,
    max_steps: int,
    launcher: Launcher,
    rng: random.Random,
    timeout_s: float,
) -> Campaign:
    camp = Campaign(index)
    out = work / f"campaign_{index:03d}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ckdir = out / "checkpoints"
    t0 = time.monotonic()
    expected: int | None = None
    plans, weights = zip(*PLANS.items())
    n = 0
    while True:
        kill_this = camp.kills < kills
        plan = rng.choices(plans, weights)[0] if kill_this else "none"
        mode = rng.choice(MODES)
        r = Restart(index=n, mode=mode, plan=plan, expected_resume=expected)
        markers = out / f"markers_{n}"
        markers.mkdir()
        env = {}
        if plan in HOOK_POINTS:
            env = {PAUSE_ENV: f"{plan}=120", PAUSE_MARKER_ENV: str(markers)}
        log = out / f"run_{n:03d}.log"
        log.touch()
        lines_before = _metrics_lines(out)
        proc = launcher.spawn(_train_args(out, mode, max_steps), log, env)
        if kill_this:
            r.killed = _wait_for_kill_point(proc, plan, out, log, markers, rng, ref, timeout_s)
        else:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill(proc)
                camp.errors.append(f"final run timed out; log {log}")
        r.exit_code = proc.returncode
        text = log.read_text(errors="replace")
        m = RESUMED_RE.search(text)
        r.resumed = int(m.group(1)) if m else None
        # trained (a metrics line or a save of its own) without a resume line = started fresh
        r.reached_training = _metrics_lines(out) > lines_before or "checkpoint step" in text
        if r.resumed is not None:
            # `latest` first; with no usable `latest`, the newest complete step_N is correct too
            r.outcome = (
                "loaded"
                if (expected is None or r.resumed >= expected)
                else f"WRONG: resumed step {r.resumed}, latest was {expected}"
            )
        elif r.reached_training or r.exit_code == 0:
            r.outcome = (
                "fresh" if expected is None else f"WRONG: started fresh, latest was {expected}"
            )
        else:
            r.outcome = "not reached"
        r.latest_at_death = latest_step(ckdir)
        if not r.killed and r.exit_code != 0 and not camp.errors:
            camp.errors.append(
                f"run {n} exited {r.exit_code} without being killed; log {log}:\n" + text[-2000:]
            )
        camp.restarts.append(r)
        expected = r.latest_at_death
        n += 1
        if not r.killed:
            if r.exit_code == 0 or camp.errors:
                break
            if n > kills + 5:
                camp.errors.append("the run neither finished nor could be killed")
                break
    camp.wall_s = time.monotonic() - t0
    if camp.errors:
        return camp
    _compare(camp, out, ref, max_steps)
    camp.leftover_tmp = sum(1 for p in ckdir.iterdir() if p.name.startswith(".tmp_step_"))
    return camp


def _compare(camp: Campaign, out: Path, ref: Reference, max_steps: int) -> None:
    import torch

    rows = read_metrics(out)
    seen = {r["step"] for r in rows}
    camp.steps_complete = seen == set(range(1, max_steps + 1))
    bad = [r["step"] for r in rows if (r["loss"], r["lr"]) != ref.losses.get(r["step"])]
    camp.losses_equal = not bad
    if bad:
        camp.errors.append(f"losses differ from the reference at steps {sorted(set(bad))[:10]}")
    got = final_tensors(out / "checkpoints")
    camp.tensors_compared = len(ref.tensors)
    diff = [
        k
        for k in ref.tensors
        if k not in got
        or not (got[k].dtype == ref.tensors[k].dtype and torch.equal(got[k], ref.tensors[k]))
    ]
    diff += [k for k in got if k not in ref.tensors]
    camp.weights_equal = not diff
    if diff:
        camp.errors.append(f"final tensors differ: {diff[:5]}")


# ---------------------------------------------------------------------------------------------
# Driver and report


@dataclass
class Summary:
    trials: int
    restarts: int
    loads: int
    loads_ok: int
    fresh_ok: int
    not_reached: int
    wrong: int
    campaigns: int
    campaigns_bit_equal: int
    max_lost_steps: int
    plans: dict[str, int]
    not_reached_by_plan: dict[str, int]  # restarts killed before their resume, by kill plan
    modes: dict[str, int]
    wall_s: float
    ok: bool


def summarize(camps: list[Campaign], wall_s: float) -> Summary:
    rs = [r for c in camps for r in c.restarts]
    restarts = [r for c in camps for r in c.restarts[1:]]  # every process after the first
    lost = [
        r.expected_resume - r.resumed
        for r in restarts
        if r.resumed is not None and r.expected_resume is not None
    ]
    wrong = sum(r.outcome.startswith("WRONG") for r in rs)
    return Summary(
        trials=sum(c.kills for c in camps),
        restarts=len(restarts),
        loads=sum(r.resumed is not None for r in restarts),
        loads_ok=sum(r.outcome == "loaded" for r in restarts),
        fresh_ok=sum(r.outcome == "fresh" for r in restarts),
        not_reached=sum(r.outcome == "not reached" for r in restarts),
        wrong=wrong,
        campaigns=len(camps),
        campaigns_bit_equal=sum(c.ok for c in camps),
        max_lost_steps=max([0, *lost]),
        plans=dict(Counter(r.plan for r in rs if r.killed)),
        not_reached_by_plan=dict(Counter(r.plan for r in restarts if r.outcome == "not reached")),
        modes=dict(Counter(r.mode for r in rs)),
        wall_s=round(wall_s, 1),
        ok=wrong == 0 and all(c.ok for c in camps),
    )


def render(camps: list[Campaign], s: Summary) -> str:
    head = (
        "campaign",
        "kills",
        "restarts",
        "loaded",
        "fresh",
        "not-reached",
        "losses",
        "weights",
        "tmp-left",
        "wall-s",
    )
    rows = [head]
    for c in camps:
        rest = c.restarts[1:]
        rows.append(
            (
                str(c.index),
                str(c.kills),
                str(len(rest)),
                f"{sum(r.outcome == 'loaded' for r in rest)}/{sum(r.resumed is not None for r in rest)}",
                str(sum(r.outcome == "fresh" for r in rest)),
                str(sum(r.outcome == "not reached" for r in rest)),
                "bit-equal" if c.losses_equal and c.steps_complete else "DIFFER",
                "bit-equal" if c.weights_equal else "DIFFER",
                str(c.leftover_tmp),
                f"{c.wall_s:.1f}",
            )
        )
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w[i]) for i, v in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    lines += [
        "",
        f"trials (SIGKILLs): {s.trials}   restarts: {s.restarts}   loads: {s.loads_ok}/{s.loads} "
        f"from the step `latest` named   fresh starts (no latest yet): {s.fresh_ok}   "
        f"killed before resume: {s.not_reached}   wrong: {s.wrong}",
        f"steps lost beyond the last committed one: max {s.max_lost_steps}   campaigns bit-equal "
        f"(losses + final weights + AdamW moments): {s.campaigns_bit_equal}/{s.campaigns}",
        "kill points: " + ", ".join(f"{k}={v}" for k, v in sorted(s.plans.items())),
        "killed before their resume, by kill point: "
        + (", ".join(f"{k}={v}" for k, v in sorted(s.not_reached_by_plan.items())) or "none"),
        "checkpoint modes (per process): "
        + ", ".join(f"{k}={v}" for k, v in sorted(s.modes.items())),
        f"wall: {s.wall_s}s   verdict: {'PASS' if s.ok else 'FAIL'}",
    ]
    for c in camps:
        for e in c.errors:
            lines.append(f"campaign {c.index}: {e}")
        for r in c.restarts:
            if r.outcome.startswith("WRONG"):
                lines.append(f"campaign {c.index} run {r.index} ({r.plan}, {r.mode}): {r.outcome}")
    return "\n".join(lines)


def fuzz(
    trials: int,
    work: Path,
    seed: int = 0,
    max_steps: int = 12,
    kills_per_campaign: int = 7,
    nproc: int = 1,
    launcher: str = "fork",
    timeout_s: float = 180.0,
    echo: bool = True,
) -> tuple[Summary, str]:
    """Run ``trials`` SIGKILL trials; returns the summary and the rendered table."""
    t0 = time.monotonic()
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    ref = run_reference(work, max_steps, nproc, timeout_s)
    runner = ForkLauncher() if launcher == "fork" and nproc == 1 else Launcher(nproc)
    camps: list[Campaign] = []
    left = trials
    while left > 0 and len(camps) < 4 * math.ceil(trials / kills_per_campaign) + 4:
        # spread the kills evenly over the campaigns still needed
        k = math.ceil(left / math.ceil(left / kills_per_campaign))
        i = len(camps)
        try:
            camp = run_campaign(i, work, ref, k, max_steps, runner, rng, timeout_s)
        except BaseException:
            runner.close()
            raise
        left -= camp.kills
        camps.append(camp)
        if echo:
            print(
                f"campaign {i}: {camp.kills} kills, {'ok' if camp.ok else 'FAILED'} "
                f"({camp.wall_s:.1f}s)",
                flush=True,
            )
    runner.close()
    s = summarize(camps, time.monotonic() - t0)
    return s, render(camps, s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="number of SIGKILLs (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=12, help="train.max_steps of every run")
    p.add_argument("--kills-per-campaign", type=int, default=7)
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun when > 1)")
    p.add_argument(
        "--launcher",
        choices=["fork", "exec"],
        default="fork",
        help="fork: runs forked from a pre-imported zygote (fast); exec: a fresh "
        "`python -m kempnerforge.train` per run (always used for the reference and "
        "when --nproc > 1)",
    )
    p.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help="kept when given; default: a temp dir, removed")
    p.add_argument("--json", default=None, help="write the summary as JSON here")
    args = p.parse_args(argv)
    if args.zygote:
        zygote()
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kf-fuzz-"))
    try:
        s, table = fuzz(
            args.trials,
            work,
            args.seed,
            args.steps,
            args.kills_per_campaign,
            args.nproc,
            args.launcher,
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(s), indent=2) + "\n")
    return 0 if s.ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
