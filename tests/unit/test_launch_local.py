"""The local launcher with real processes: small worker scripts that exit with chosen codes, read
their environment, catch signals and record what they saw (no mocks).

Each test runs ``python -m kempnerforge.launch --local ... -- python worker.py OUT MODE`` in its
own directory and reads the files the workers wrote, the launcher's lines and its records.
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

import pytest

WORKER = r'''
import json, os, signal, sys, time
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])
restart = int(os.environ["KEMPNERFORGE_RESTART_COUNT"])
KEYS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
        "MASTER_PORT", "KEMPNERFORGE_JOB_ID", "KEMPNERFORGE_RESTART_COUNT", "NCCL_NVLS_ENABLE"]
seen = {k: os.environ.get(k) for k in KEYS}
seen["session_leader"] = os.getsid(0) == os.getpid()
(out / f"env_{restart}_{rank}.json").write_text(json.dumps(seen))


def mark(name):
    (out / f"{name}_{restart}_{rank}").write_text(str(time.time()))


def commit(step):
    """A checkpoint as the resolver accepts it: metadata.json, .metadata, a train state, latest."""
    root = out / "ckpt"
    d = root / f"step_{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / ".metadata").write_bytes(b"")
    (d / "train_state").mkdir(exist_ok=True)
    (d / "train_state" / "rank_00000.pt").write_bytes(b"")
    (d / "metadata.json").write_text(json.dumps({"step": step}))
    tmp = root / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(d.name)
    os.replace(tmp, root / "latest")


def wait_for_signal(code):
    got = []
    def handler(signum, frame):
        got.append(signum)
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, handler)
    mark("ready")
    deadline = time.time() + 20
    while not got and time.time() < deadline:
        time.sleep(0.01)
    mark(f"got{signal.Signals(got[0]).name}" if got else "nosignal")
    sys.exit(code)


if mode == "env":
    sys.exit(0)
if mode == "restart":  # two preemptions, then done
    sys.exit(75 if restart < 2 else 0)
if mode == "always75":
    sys.exit(75)
if mode == "refuse":
    sys.exit(76 if rank == 0 else 75)
if mode == "hang77":
    sys.exit(77 if restart == 0 else 0)
if mode == "late_usr1":  # rank 1 installs its handler a second after rank 0
    if rank == 1:
        time.sleep(1.0)
    if restart == 0:
        wait_for_signal(75)
    sys.exit(0)
if mode == "early_usr1":  # the signal comes before the task even started: it must wait
    time.sleep(0.5)
    if restart == 0:
        wait_for_signal(75)
    sys.exit(0)
if mode == "stop_lines":  # the training side's one line per stop
    if restart == 0:
        print(f"kempnerforge stop: reason=preempt step=5 saved=yes requeue=yes exit=75: run {restart}")
        sys.exit(75)
    if rank == 1:
        print("kempnerforge stop: reason=user-cancel step=12 saved=yes requeue=not-needed exit=0")
    sys.exit(0)
if mode == "cancel":
    wait_for_signal(75)
if mode == "ignore_term":  # never installs a handler: SIGTERM stays ignored as it started
    mark("ready")
    time.sleep(60)
if mode == "crash":
    if rank == 1:
        time.sleep(0.2)
        raise ValueError(f"boom on rank {rank}")
    wait_for_signal(0)
if mode == "crash_after_progress":  # runs 0 and 1 commit a step, run 2 does not
    if rank == 0 and restart < 2:
        commit(10 * (restart + 1))
    if rank == 0:
        raise RuntimeError(f"crash in run {restart}")
    time.sleep(0.2)
    sys.exit(0)
if mode == "killed_after_progress":  # run 0 commits a step, then its rank 0 is SIGKILLed
    if restart == 0 and rank == 0:
        commit(10)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2 if restart else 30)
    sys.exit(0)
if mode == "crash_at_start":
    raise ImportError("no module named my_model")
if mode == "hang_after_peer":
    if rank == 1:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        mark("ready")
        time.sleep(60)
    sys.exit(0)
raise SystemExit(f"unknown mode {mode}")
'''

LINE = re.compile(r"^\[kempnerforge\.launch\] .*$", re.M)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "out").mkdir()
    return tmp_path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("KEMPNERFORGE_JOB_ID", None)
    return env


def _cmd(work: Path, mode: str, *launcher: str, tasks: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kempnerforge.launch",
        "--local",
        "--tasks-per-node",
        str(tasks),
        *launcher,
        "--",
        sys.executable,
        str(work / "worker.py"),
        str(work / "out"),
        mode,
    ]


def launch(work: Path, mode: str, *launcher: str, tasks: int = 2, timeout: float = 60):
    t0 = time.monotonic()
    res = subprocess.run(
        _cmd(work, mode, *launcher, tasks=tasks),
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return res, time.monotonic() - t0


def start(work: Path, mode: str, *launcher: str, tasks: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        _cmd(work, mode, *launcher, tasks=tasks),
        cwd=work,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_file(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def envs(work: Path, restart: int) -> list[dict]:
    files = sorted((work / "out").glob(f"env_{restart}_*.json"))
    return [json.loads(p.read_text()) for p in files]


def restart_lines(output: str) -> list[str]:
    return [ln for ln in LINE.findall(output) if "restarting (restart " in ln]


def exit_records(work: Path) -> list[dict]:
    recs = [json.loads(p.read_text()) for p in (work / "runs" / "local").glob("*_exit.json")]
    return sorted(recs, key=lambda r: (r["restart"], r["rank"]))


def test_every_task_gets_the_torchrun_variables(work):
    res, _ = launch(work, "env", "--nodes", "2", tasks=2)
    assert res.returncode == 0, res.stdout + res.stderr
    seen = envs(work, 0)
    assert sorted(int(e["RANK"]) for e in seen) == [0, 1, 2, 3]
    assert {e["WORLD_SIZE"] for e in seen} == {"4"}
    assert {e["LOCAL_WORLD_SIZE"] for e in seen} == {"4"}  # all on this host
    assert sorted(e["LOCAL_RANK"] for e in seen) == ["0", "1", "2", "3"]
    assert {e["GROUP_RANK"] for e in seen} == {"0"}
    assert {e["MASTER_ADDR"] for e in seen} == {"127.0.0.1"}
    assert len({e["MASTER_PORT"] for e in seen}) == 1  # one rendezvous for the run
    assert int(seen[0]["MASTER_PORT"]) > 0
    assert len({e["KEMPNERFORGE_JOB_ID"] for e in seen}) == 1
    assert seen[0]["KEMPNERFORGE_JOB_ID"].startswith("local-")
    assert {e["KEMPNERFORGE_RESTART_COUNT"] for e in seen} == {"0"}
    assert {e["NCCL_NVLS_ENABLE"] for e in seen} == {"0"}
    assert all(e["session_leader"] for e in seen)  # Ctrl-C in a terminal reaches only us
    assert LINE.findall(res.stdout)[-1].endswith("exit codes [0, 0, 0, 0]: done")


def test_restart_on_75_one_line_per_restart_new_port(work):
    res, _ = launch(work, "restart")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = LINE.findall(res.stdout)
    restarts = restart_lines(res.stdout)
    assert len(restarts) == 2, lines
    assert all("exit codes [75, 75]" in ln for ln in restarts)
    assert len(lines) == 4  # the start, two restarts, the end
    assert lines[-1].endswith("restart 2: exit codes [0, 0]: done")
    ports = [{e["MASTER_PORT"] for e in envs(work, r)} for r in range(3)]
    assert all(len(p) == 1 for p in ports)
    assert len(set().union(*ports)) == 3  # a new rendezvous port for every run
    assert [{e["KEMPNERFORGE_RESTART_COUNT"] for e in envs(work, r)} for r in range(3)] == [
        {"0"},
        {"1"},
        {"2"},
    ]
    assert len({e["KEMPNERFORGE_JOB_ID"] for r in range(3) for e in envs(work, r)}) == 1


def test_hang_exit_77_restarts(work):
    res, _ = launch(work, "hang77")
    assert res.returncode == 0, res.stdout
    assert len(restart_lines(res.stdout)) == 1


def test_stop_on_76(work):
    res, _ = launch(work, "refuse")
    assert res.returncode == 76, res.stdout
    assert not restart_lines(res.stdout)
    last = LINE.findall(res.stdout)[-1]
    assert "exit codes [76, 75]: stop: the requeue guard refused another run" in last
    assert not envs(work, 1)


def test_max_requeues_bounds_restarts(work):
    res, _ = launch(work, "always75", "--max-requeues", "2")
    assert res.returncode == 76, res.stdout
    assert len(restart_lines(res.stdout)) == 2
    assert "stop: --max-requeues 2 restart(s) used" in LINE.findall(res.stdout)[-1]


def test_usr1_reaches_every_task_even_one_that_installs_its_handler_late(work):
    proc = start(work, "late_usr1")
    wait_file(work / "out" / "ready_0_0")
    assert not (work / "out" / "ready_0_1").exists()  # rank 1 has no handler yet
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert (work / "out" / "gotSIGUSR1_0_0").exists()
    assert (work / "out" / "gotSIGUSR1_0_1").exists()  # held until its handler was there
    assert len(restart_lines(out)) == 1 and "exit codes [75, 75]" in restart_lines(out)[0]


def test_usr1_at_once_after_start_is_not_lost(work):
    """Sent as soon as the launcher announces the run: the tasks may not exist yet, or not yet
    run Python; the signal waits for each task's handler either way, and kills none."""
    proc = start(work, "early_usr1")
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert "restart 0: 2 local task(s)" in first, first
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, first + out
    assert (work / "out" / "gotSIGUSR1_0_0").exists()
    assert (work / "out" / "gotSIGUSR1_0_1").exists()
    assert len(restart_lines(out)) == 1 and "exit codes [75, 75]" in out


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cancel_forwards_sigterm_and_never_restarts(work, sig, code):
    proc = start(work, "cancel")
    wait_file(work / "out" / "ready_0_0")
    wait_file(work / "out" / "ready_0_1")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == code, out
    # the tasks saw SIGTERM (whatever the launcher got), exited 75, and were not restarted
    assert (work / "out" / "gotSIGTERM_0_0").exists()
    assert (work / "out" / "gotSIGTERM_0_1").exists()
    assert not restart_lines(out) and not envs(work, 1)
    assert "exit codes [75, 75]: cancelled" in LINE.findall(out)[-1]


def test_second_cancel_kills_tasks_that_ignore_sigterm(work):
    proc = start(work, "ignore_term", "--grace", "60")
    wait_file(work / "out" / "ready_0_0")
    wait_file(work / "out" / "ready_0_1")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # the tasks have SIGTERM ignored: waiting for the grace
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out
    assert time.monotonic() - t0 < 10
    assert "exit codes [-9, -9]: cancelled" in out


def test_a_crash_ends_the_others_and_the_run(work):
    res, took = launch(work, "crash")
    assert res.returncode == 1, res.stdout
    assert took < 15
    assert (work / "out" / "gotSIGTERM_0_0").exists()  # rank 0 was asked to stop
    last = LINE.findall(res.stdout)[-1]
    assert "crash: rank 1 exit 1: ValueError: boom on rank 1" in last, last
    assert "not restarting: --requeue-on-crash not given" in last
    recs = exit_records(work)
    assert [(r["rank"], r["crash"]) for r in recs] == [(0, False), (1, True)]
    assert recs[1]["exception"] == "ValueError: boom on rank 1"
    assert recs[1]["exit_code"] == 1
    assert any("Traceback" in ln for ln in recs[1]["log_tail"])
    assert recs[0]["ended_by"] == "ended: crash"


def test_a_task_that_hangs_after_the_others_exited_is_ended(work):
    res, took = launch(work, "hang_after_peer", "--grace", "1")
    assert took < 15, res.stdout
    assert res.returncode == 143, res.stdout  # rank 1 was ended with SIGTERM
    assert "still running 1 s after another task exited: ending rank(s) 1" in res.stdout
    assert "hung after another task exited" in LINE.findall(res.stdout)[-1]


def test_requeue_on_crash_restarts_only_after_progress(work):
    ckpt = work / "out" / "ckpt"
    res, _ = launch(
        work, "crash_after_progress", "--requeue-on-crash", "--checkpoint-dir", str(ckpt)
    )
    assert res.returncode == 1, res.stdout
    restarts = restart_lines(res.stdout)
    assert len(restarts) == 2, res.stdout
    assert "the resume step advanced from none to 10" in restarts[0]
    assert "the resume step advanced from 10 to 20" in restarts[1]
    last = LINE.findall(res.stdout)[-1]
    assert "RuntimeError: crash in run 2" in last
    assert "not restarting: no progress during this run (resume step: still at step 20)" in last
    pol = [r["decision"]["crash_policy"] for r in exit_records(work) if r["rank"] == 0]
    assert [p["restart"] for p in pol] == [True, True, False]
    assert [p["step_after"] for p in pol] == [10, 20, 20]


def test_a_task_killed_by_a_signal_is_restarted_when_the_policy_allows(work):
    ckpt = work / "out" / "ckpt"
    res, _ = launch(
        work, "killed_after_progress", "--requeue-on-crash", "--checkpoint-dir", str(ckpt)
    )
    assert res.returncode == 0, res.stdout
    restarts = restart_lines(res.stdout)
    assert len(restarts) == 1 and "the resume step advanced from none to 10" in restarts[0]
    assert "killed by SIGKILL" in res.stdout, res.stdout
    res, _ = launch(work, "killed_after_progress")  # without the policy: the crash ends it
    assert res.returncode != 0 and not restart_lines(res.stdout), res.stdout


def test_requeue_on_crash_is_bounded_by_max_requeues(work):
    ckpt = work / "out" / "ckpt"
    res, _ = launch(
        work,
        "crash_after_progress",
        "--requeue-on-crash",
        "--checkpoint-dir",
        str(ckpt),
        "--max-requeues",
        "1",
    )
    assert res.returncode == 1, res.stdout
    assert len(restart_lines(res.stdout)) == 1
    assert "(--max-requeues 1)" in LINE.findall(res.stdout)[-1]


def test_crash_at_start_stops_after_one_try_and_status_says_why(work):
    ckpt = work / "out" / "ckpt"
    res, _ = launch(work, "crash_at_start", "--requeue-on-crash", "--checkpoint-dir", str(ckpt))
    assert res.returncode == 1, res.stdout
    assert not restart_lines(res.stdout)
    last = LINE.findall(res.stdout)[-1]
    assert "ImportError: no module named my_model" in last
    assert "not restarting: no progress during this run (resume step: no checkpoint yet)" in last
    job = re.search(r"job (local-\w+)", last).group(1)
    st = subprocess.run(
        [sys.executable, "-m", "kempnerforge.launch", "--status", job],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert st.returncode == 0, st.stderr
    assert re.search(r"state:\s+FAILED", st.stdout), st.stdout
    assert re.search(r"committed step:\s+none yet", st.stdout), st.stdout
    reason = [ln for ln in st.stdout.splitlines() if ln.strip().startswith("reason:")]
    assert len(reason) == 1, st.stdout
    assert "crash: rank 0 exit 1 (crash): ImportError: no module named my_model" in reason[0]
    assert "not restarted: no progress" in reason[0]


def test_status_of_a_completed_local_job(work):
    res, _ = launch(work, "restart")
    job = re.search(r"job (local-\w+)", res.stdout).group(1)
    st = subprocess.run(
        [sys.executable, "-m", "kempnerforge.launch", "--status", job],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert re.search(r"restart count:\s+2", st.stdout), st.stdout
    assert st.stdout.rstrip().splitlines()[-1].split() == ["reason:", "completed"]


def test_status_shows_the_last_runs_stop_line(work):
    res, _ = launch(work, "stop_lines")
    assert res.returncode == 0, res.stdout
    job = re.search(r"job (local-\w+)", res.stdout).group(1)
    st = subprocess.run(
        [sys.executable, "-m", "kempnerforge.launch", "--status", job],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    want = "kempnerforge stop: reason=user-cancel step=12 saved=yes requeue=not-needed exit=0"
    assert re.search(rf"stop line:\s+{re.escape(want)}$", st.stdout, re.M), st.stdout
    assert st.stdout.rstrip().splitlines()[-1].split(None, 1) == ["reason:", want]


def test_the_launcher_does_not_import_torch(tmp_path):
    """Submitting a command (dry run included) and the per-task wrapper stay light."""
    code = (
        "import sys\n"
        "from kempnerforge.launch import cli, task\n"
        f"rc = cli.main(['--dry-run', '--folder', {str(tmp_path)!r}, '--', 'python', 'x.py'])\n"
        "assert rc == 0\n"
        "assert task.main(['--', sys.executable, '-c', 'pass']) == 0\n"
        "assert 'torch' not in sys.modules, 'the launcher imported torch'\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert res.returncode == 0, res.stderr
