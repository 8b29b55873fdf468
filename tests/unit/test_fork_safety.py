"""Nothing the checkpoint manager installs may act in a process forked from it.

DataLoader workers (``fork`` start method) inherit the manager's memory: its exit hook, its job
lock's descriptor, its signal handlers, its watchdogs and their ``faulthandler`` backstop, its
async checkpointer with a save in flight. None of the threads behind them comes along. Each test
runs the scenario in a fresh interpreter (real ``fork``, real ``flock``, real signals, a save
slowed by the protocol's own test pause) and looks at it from outside: the lock is probed from a
separate process, stderr is read for messages from the workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from kempnerforge.checkpoint import CheckpointManager, exit_flush, storage
from kempnerforge.checkpoint.async_save import AsyncCheckpointer, CheckpointError
from kempnerforge.checkpoint.lock import LOCK_FILE, CheckpointDirLockedError, acquire_job_lock
from kempnerforge.config import AsyncCheckpointMode, CheckpointConfig

WORKER_JOIN_S = 5.0  # how long a DataLoader waits for a worker to exit before killing it

# Tries the writer lock's flock from a process of its own: "held" or "free".
PROBE = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("held")
    else:
        print("free")
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "KEMPNERFORGE_"))
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _probe(directory: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(directory / LOCK_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip()


def _script(code: str, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a session of its own; on timeout its forked children are ended too."""
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"timed out after {timeout}s (a forked process blocked?):\n{err[-3000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# ---------------------------------------------------------------------------------------------
# The job lock
# ---------------------------------------------------------------------------------------------
LOCK_FORK = """
    import json, os, sys, weakref
    from kempnerforge.checkpoint.lock import acquire_job_lock

    d = sys.argv[1]
    lk = acquire_job_lock(d, job_id="job-parent")
    lk2 = acquire_job_lock(d, job_id="job-parent")  # a second manager's handle

    class Owner:  # stands for a manager dropped without close(): released by its finalizer
        pass

    owner = Owner()
    weakref.finalize(owner, lk2.release)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        info = {"owns_flock": lk.owns_flock}
        own = acquire_job_lock(d, job_id="job-parent")  # asked for by the child itself
        info["own_owns_flock"] = own.owns_flock
        own.release()
        lk.release()
        lk.release()
        os.write(w, json.dumps(info).encode())
        sys.exit(0)  # exit handlers run the finalizer: the last handle is released here
    os.close(w)
    child = json.loads(os.read(r, 4096))
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"child": child, "status": status, "pid": os.getpid()}), flush=True)
    sys.stdin.read()  # hold the lock until the test closes stdin
    print(json.dumps({"owns_flock": lk.owns_flock and lk2.owns_flock}), flush=True)
"""


def test_forked_child_releasing_the_lock_leaves_the_parents_flock_held(tmp_path: Path) -> None:
    """A child's release (explicit, again, and through an exit-time finalizer) must not
    ``LOCK_UN`` the descriptor it shares with the parent, nor touch the parent's record."""
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(LOCK_FORK), str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        line = p.stdout.readline()
        assert line, p.stderr.read()
        got = json.loads(line)
        assert got["status"] == 0
        assert _probe(tmp_path) == "held"
        with pytest.raises(CheckpointDirLockedError, match="job-parent"):
            acquire_job_lock(tmp_path, job_id="job-other", wait_s=0.3)
        record = json.loads((tmp_path / storage.LOCK_RECORD_FILE).read_text())
        assert record["pid"] == got["pid"] and record["job_id"] == "job-parent"
        # the child never held the kernel lock; asking for it itself made it a member
        assert got["child"] == {"owns_flock": False, "own_owns_flock": False}
        out, err = p.communicate("", timeout=60)
        assert json.loads(out) == {"owns_flock": True}, err
    finally:
        p.kill()
        p.wait()


ORPHAN = """
    import os, sys, time
    from kempnerforge.checkpoint.lock import acquire_job_lock

    acquire_job_lock(sys.argv[1], job_id="job-parent")
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # let the test read the parent's output to its end
        os.dup2(null, 2)
        time.sleep(600)
        os._exit(0)
    print(pid, flush=True)
    os._exit(0)  # the holder dies; its forked child lives on
"""


def test_a_forked_child_does_not_keep_the_lock_after_the_holder_died(tmp_path: Path) -> None:
    """The child closed its copy of the descriptor at fork: a worker that outlives the holder
    does not keep the directory locked."""
    p = _script(ORPHAN, str(tmp_path), timeout=60)
    child = int(p.stdout.strip())
    try:
        assert _probe(tmp_path) == "free"
    finally:
        os.kill(child, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Signal handlers
# ---------------------------------------------------------------------------------------------
SIGNALS_FORK = """
    import json, os, signal, sys, time
    from kempnerforge.resilience.signals import PreemptionFlag

    def user_term(signum, frame):  # the program's own SIGTERM handler, there before ours
        os._exit(42)

    signal.signal(signal.SIGTERM, user_term)
    flag = PreemptionFlag().install(["SIGUSR1", "SIGTERM"])
    pid = os.fork()
    if pid == 0:
        quiet = all(
            signal.getsignal(s) not in (flag._handle, user_term, signal.SIG_DFL)
            for s in (signal.SIGTERM, signal.SIGUSR1)
        )
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        os._exit(0 if quiet and not flag.requested else 3)  # alive, and nothing recorded
    _, status = os.waitpid(pid, 0)
    report = {"child": [os.WIFEXITED(status) and os.WEXITSTATUS(status),
                        os.WIFSIGNALED(status) and os.WTERMSIG(status)]}
    report["parent_installed"] = flag.installed and not flag.requested
    report["parent_term"] = signal.getsignal(signal.SIGTERM) == flag._handle
    flag.uninstall()
    report["restored"] = signal.getsignal(signal.SIGTERM) is user_term
    print(json.dumps(report))
"""


def test_preemption_signals_do_nothing_in_a_forked_child(tmp_path: Path) -> None:
    """A worker gets the preemption signals too (SLURM and the launcher signal every process of
    the task): in the child they neither set a flag nor kill it; the parent keeps its handlers."""
    p = _script(SIGNALS_FORK, timeout=120)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["child"] == [0, False], report  # survived both, recorded nothing
    assert report["parent_installed"] and report["parent_term"] and report["restored"], report


# ---------------------------------------------------------------------------------------------
# Watchdogs and the faulthandler backstop
# ---------------------------------------------------------------------------------------------
WATCHDOG_CHILD = """
    import faulthandler, json, os, sys, time
    from kempnerforge.resilience import watchdog

    hang = watchdog.HangWatchdog(lambda m: 3, timeout_s=0.5, poll_s=0.05)
    hang.beat(1)
    with watchdog.SaveWatchdog(30.0, "stop save", lambda: 4):
        pid = os.fork()
        if pid == 0:
            t = time.monotonic()
            faulthandler.dump_traceback_later(60)  # the worker's own timer, if it has one
            faulthandler.cancel_dump_traceback_later()
            hang.beat(2)  # a beat in the child starts nothing
            hang.stop()
    if pid == 0:
        time.sleep(1.5)  # three hang thresholds: nothing may end this process
        os._exit(0 if time.monotonic() - t < 5 else 1)
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        hang.beat(1)
        time.sleep(0.05)
    hang.stop()
    print("parent done", flush=True)
"""


def test_watchdogs_are_inert_in_a_forked_child() -> None:
    """A child forked while the stop save's watchdog is armed can arm and cancel its own
    faulthandler timer (an inherited armed one would make that wait forever), and neither
    watchdog ends it."""
    p = _script(WATCHDOG_CHILD, timeout=60)
    assert p.returncode == 0 and "parent done" in p.stdout, p.stderr[-3000:]
    assert "watchdog" not in p.stderr and "no step progress" not in p.stderr, p.stderr[-3000:]


BACKSTOP_PARENT = """
    import os, sys, time
    from kempnerforge.resilience import watchdog

    watchdog.BACKSTOP_S = 1.0
    with watchdog.SaveWatchdog(0.3, "stop save", lambda: time.sleep(600) or 0):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(600)  # the save hangs; its watchdog's decision hangs too
"""


def test_the_backstop_still_fires_in_the_parent_after_a_fork() -> None:
    """Disarmed around the fork, re-armed in the parent: a stop save whose watchdog cannot
    finish is still ended by the backstop (faulthandler exits with 1)."""
    t = time.monotonic()
    p = _script(BACKSTOP_PARENT, timeout=60)
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    assert "did not finish within" in p.stderr and "Timeout" in p.stderr, p.stderr[-3000:]
    assert time.monotonic() - t < 30


# ---------------------------------------------------------------------------------------------
# The async checkpointer
# ---------------------------------------------------------------------------------------------
ASYNC_CHILD = """
    import os, sys, threading, time
    import torch
    from kempnerforge.checkpoint.async_save import AsyncCheckpointer, CheckpointError
    from kempnerforge.checkpoint.config import AsyncCheckpointMode

    d = sys.argv[1]
    go = threading.Event()
    ck = AsyncCheckpointer(AsyncCheckpointMode.async_)
    sd = {"w": torch.arange(1000.0)}
    ck.save(sd, d + "/a", on_written=lambda group: go.wait(60))
    assert ck.is_pending
    pid = os.fork()
    if pid == 0:
        t = time.monotonic()
        bad = []
        if ck.is_pending:
            bad.append("pending")
        if not ck.join(timeout=2):
            bad.append("join")
        ck.wait()
        try:
            ck.save(sd, d + "/b")
            bad.append("saved")
        except CheckpointError:
            pass
        ck.close()
        if time.monotonic() - t > 1.5:
            bad.append("slow")
        print("child", bad, flush=True)
        sys.exit(0 if not bad else 1)
    _, status = os.waitpid(pid, 0)
    assert ck.is_pending, "the parent's save is still running"
    go.set()
    ck.wait()
    ck.close()
    print("status", status, flush=True)
"""


def test_async_checkpointer_in_a_forked_child_waits_for_nothing(tmp_path: Path) -> None:
    """The parent's save is not the child's: nothing pending there, join and wait return at
    once, close touches no thread, and a save is refused."""
    p = _script(ASYNC_CHILD, str(tmp_path), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "child []" in p.stdout and "status 0" in p.stdout, (p.stdout, p.stderr[-3000:])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_finished_save_is_not_pending_and_a_failed_one_still_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = nn.Linear(8, 8)
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(tmp_path / "ck"), async_mode="async"),
        m,
        torch.optim.SGD(m.parameters(), lr=0.1),
    )
    try:
        mgr.save(3)
        assert mgr.checkpointer.join(timeout=60)
        assert not mgr.checkpointer.is_pending  # finished, not waited for yet
        assert mgr.inflight_step is None and mgr.checkpointer.unreported_failure is None
        assert os.readlink(tmp_path / "ck" / "latest") == "step_3"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=exit_flush.__name__):
            exit_flush.flush_at_exit(mgr)  # what the exit hook does: a finished save is not
        # "in flight", and there is nothing to report
        assert [r for r in caplog.records if r.name == exit_flush.__name__] == []
        mgr.wait()
    finally:
        mgr.close()

    ck = AsyncCheckpointer(AsyncCheckpointMode.async_)
    sd = {"w": torch.ones(4)}

    def boom(group: object) -> None:
        raise OSError("disk gone")

    try:
        for then in ("wait", "save"):
            ck.save(sd, str(tmp_path / f"bad-{then}"), on_written=boom)
            assert ck.join(timeout=60)
            assert not ck.is_pending
            assert isinstance(ck.unreported_failure, CheckpointError)
            with pytest.raises(CheckpointError, match="disk gone"):
                if then == "wait":
                    ck.wait()
                else:
                    ck.save(sd, str(tmp_path / "next"))
            assert ck.unreported_failure is None
    finally:
        ck.close()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_exit_hook_reports_a_finished_failure_as_such(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A background save that failed and was never waited for is named as a failure at exit,
    not as a save "in flight"."""
    m = nn.Linear(8, 8)
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(tmp_path / "ck"), async_mode="async"),
        m,
        torch.optim.SGD(m.parameters(), lr=0.1),
    )

    def boom(group: object) -> None:
        raise OSError("disk gone")

    ck = mgr.checkpointer
    ck.save({"w": torch.ones(4)}, str(tmp_path / "bad"), on_written=boom)
    assert ck.join(timeout=60) and not ck.is_pending
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=exit_flush.__name__):
        exit_flush.flush_at_exit(mgr)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == exit_flush.__name__)
    assert "failed and was never waited for" in text and "disk gone" in text, text
    assert "in flight" not in text, text
    mgr.close()


# ---------------------------------------------------------------------------------------------
# The whole thing: a training loop with DataLoader workers while an async save runs
# ---------------------------------------------------------------------------------------------
LOOP = """
    import json, logging, os, subprocess, sys, time
    import torch, torch.nn as nn, torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from torchdata.stateful_dataloader import StatefulDataLoader
    from kempnerforge.checkpoint import CheckpointManager
    from kempnerforge.config import CheckpointConfig

    logging.basicConfig(
        level=logging.INFO, format="pid=%(process)d %(name)s %(levelname)s: %(message)s"
    )
    root, probe = sys.argv[1], sys.argv[2]
    LOADERS = {"torch": DataLoader, "stateful": StatefulDataLoader}

    def lock_state(ckpt_dir):
        out = subprocess.run([sys.executable, "-c", probe, os.path.join(ckpt_dir, ".lock")],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip()

    def scenario(kind):
        ckpt_dir = os.path.join(root, kind)
        torch.manual_seed(0)
        model = nn.Linear(8, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        data = TensorDataset(torch.randn(16, 8), torch.randint(0, 2, (16,)))
        loader = LOADERS[kind](data, batch_size=4, num_workers=2, multiprocessing_context="fork")
        cfg = CheckpointConfig(dir=ckpt_dir, async_mode="async", interval=1000)
        mgr = CheckpointManager(cfg, model, opt)
        step = mgr.resume(dataloader=loader)[0]
        epochs = []

        def epoch(phase):
            nonlocal step
            rec = {"phase": phase, "lock_during": None, "max_step_s": 0.0}
            t = time.monotonic()
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                mgr.maybe_save(step, dataloader=loader)
                rec["max_step_s"] = max(rec["max_step_s"], time.monotonic() - t)
                if rec["lock_during"] is None:
                    rec["lock_during"] = lock_state(ckpt_dir)  # the workers are alive now
                t = time.monotonic()
            rec["end_s"] = time.monotonic() - t  # the last batch to the workers' exit
            rec["in_flight"] = mgr.inflight_step is not None
            rec["pending"] = mgr.checkpointer.is_pending
            rec["lock_after"] = lock_state(ckpt_dir)
            epochs.append(rec)

        epoch("before")
        mgr.maybe_save(step, dataloader=loader, force=True)  # async: the write takes a while
        for _ in range(30):
            epoch("in-flight")
            if mgr.inflight_step is None:
                break
        deadline = time.monotonic() + 120
        while mgr.checkpointer.is_pending and time.monotonic() < deadline:
            time.sleep(0.05)
        finished_not_pending = not mgr.checkpointer.is_pending
        for _ in range(2):
            epoch("finished-not-waited")
        mgr.wait()
        return mgr, {"epochs": epochs, "finished_not_pending": finished_not_pending}

    managers, report = [], {"pid": os.getpid()}
    for kind in LOADERS:
        mgr, report[kind] = scenario(kind)
        managers.append(mgr)  # kept open: their locks are probed by another job below
    print(json.dumps(report), flush=True)
    sys.stdin.read()  # until the test is done probing
"""


def _worker_lines(stderr: str, parent_pid: int) -> list[str]:
    return [
        line
        for line in stderr.splitlines()
        if line.startswith("pid=") and not line.startswith(f"pid={parent_pid} ")
    ]


def test_dataloader_workers_come_and_go_during_an_async_save(tmp_path: Path) -> None:
    """Workers (torch's DataLoader, then torchdata's StatefulDataLoader) forked and ended while
    a save runs, then after it finished but before ``wait()``: no epoch end waits for a worker,
    the lock stays held throughout (seen from another process), the workers say nothing, and a
    finished save is not pending."""
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(LOOP), str(tmp_path), PROBE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**{storage.PAUSE_ENV: "dcp_written=2.5"}),  # each write takes 2.5 s
    )
    try:
        line = p.stdout.readline()
        if not line:
            p.kill()
            pytest.fail(p.stderr.read()[-4000:])
        report = json.loads(line)
        for kind in ("torch", "stateful"):
            with pytest.raises(CheckpointDirLockedError):
                acquire_job_lock(tmp_path / kind, job_id="another-job", wait_s=0.3)
        _, err = p.communicate("", timeout=120)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0, err[-4000:]
    for kind in ("torch", "stateful"):
        epochs = report[kind]["epochs"]
        phases = [e["phase"] for e in epochs]
        # the scenario did overlap: workers exited while the save ran, and after it finished
        assert any(e["phase"] == "in-flight" and e["in_flight"] for e in epochs), (kind, epochs)
        assert phases.count("finished-not-waited") == 2, (kind, epochs)
        for e in epochs:
            assert e["end_s"] < 3.0 < WORKER_JOIN_S, (kind, e)  # (a) no worker exit blocks
            assert e["max_step_s"] < 3.0, (kind, e)
            assert e["lock_during"] == "held" and e["lock_after"] == "held", (kind, e)  # (b)
        assert os.readlink(tmp_path / kind / "latest") == "step_4"  # 4 steps before the save
    assert "in flight at exit" not in err, err[-4000:]  # (c)
    assert _worker_lines(err, report["pid"]) == [], err[-4000:]
    for kind in ("torch", "stateful"):  # (d)
        assert report[kind]["finished_not_pending"], kind
        for e in report[kind]["epochs"]:
            if e["phase"] == "finished-not-waited":
                assert not e["pending"] and not e["in_flight"], (kind, e)


# ---------------------------------------------------------------------------------------------
# Two ranks: rank 1 is SIGKILLed after its save committed
# ---------------------------------------------------------------------------------------------
TWO_RANKS = """
    import json, logging, os, signal, subprocess, sys, time
    import torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import TensorDataset
    from torch.utils.data.distributed import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader
    from kempnerforge.checkpoint import CheckpointManager
    from kempnerforge.config import CheckpointConfig

    logging.basicConfig(
        level=logging.INFO, format="pid=%(process)d %(name)s %(levelname)s: %(message)s"
    )
    ckpt_dir, probe, pid_file = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,)))
    loader = StatefulDataLoader(data, batch_size=4, num_workers=2, multiprocessing_context="fork",
                                sampler=DistributedSampler(data, shuffle=False))
    mgr = CheckpointManager(CheckpointConfig(dir=ckpt_dir, async_mode="async", interval=10),
                            model, opt)
    step = mgr.resume(dataloader=loader)[0]
    while step < 10:  # 4 batches an epoch: the save of step 10 starts mid-epoch
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            mgr.maybe_save(step, dataloader=loader)
            if step == 10:
                break
    ends = []
    for _ in range(2):  # workers come and go while the save of step 10 is written
        for batch in loader:
            t = time.monotonic()
        ends.append([time.monotonic() - t, mgr.inflight_step is not None])
    mgr.checkpointer.join()  # finished and committed, not waited for
    if rank == 1:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    mgr.maybe_save(11)  # posts the stop agreement's all-reduce that rank 1 never joins
    pid = int(open(pid_file).read())
    while True:  # rank 1 is dead (a zombie until the test reaps it)
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.05)
    lock = subprocess.run([sys.executable, "-c", probe, os.path.join(ckpt_dir, ".lock")],
                          capture_output=True, text=True, timeout=60).stdout.strip()
    print(json.dumps({"ends": ends, "pending": mgr.checkpointer.is_pending, "lock": lock,
                      "in_flight": mgr.inflight_step}), flush=True)
    sys.exit(0)  # the exit hook runs with rank 1 gone and nothing in flight
"""


@pytest.mark.distributed
def test_two_ranks_rank1_sigkilled_after_a_committed_save(tmp_path: Path) -> None:
    """DDP on 2 ranks (the environment torchrun gives its workers, without its agent, which
    would end rank 0 when rank 1 died), StatefulDataLoader with 2 workers each: epochs end
    promptly during the async save, and once rank 1 is SIGKILLed with step 10 committed,
    rank 0 exits 0 without claiming a save was in flight (or failed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tmp_path / "ck"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(TWO_RANKS),
                str(d),
                PROBE,
                str(tmp_path / "pid"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                KEMPNERFORGE_JOB_ID="fork-safety-2r",
                OMP_NUM_THREADS="1",
                **{storage.PAUSE_ENV: "dcp_written=2.5"},
            ),
        )
        for r in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    (out0, err0), (_, err1) = outs
    assert procs[1].returncode == -signal.SIGKILL, err1[-3000:]
    assert procs[0].returncode == 0, err0[-4000:]
    report = json.loads(out0)
    assert os.readlink(d / "latest") == "step_10"
    assert report["pending"] is False and report["in_flight"] is None, report
    assert report["lock"] == "held", report
    assert any(in_flight for _, in_flight in report["ends"]), report  # the epochs overlapped
    assert all(end < 3.0 for end, _ in report["ends"]), report
    assert "in flight at exit" not in err0, err0[-4000:]
    assert "failed" not in err0, err0[-4000:]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_wait_interrupted_by_a_signal_handler_keeps_the_save_in_flight(tmp_path: Path) -> None:
    """A DataLoader's SIGCHLD handler raises in the main thread when a worker dies: if that
    happens inside ``wait()``, the error is the handler's, and the save still commits."""
    ck = AsyncCheckpointer(AsyncCheckpointMode.async_)
    gate = threading.Event()

    def slow(group: object) -> None:
        gate.wait(30)

    def worker_died(*_: object) -> None:
        raise RuntimeError("worker died")

    previous = signal.signal(signal.SIGUSR2, worker_died)
    try:
        ck.save({"w": torch.ones(4)}, str(tmp_path / "ck"), on_written=slow)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR2)).start()
        with pytest.raises(RuntimeError, match="worker died"):
            ck.wait()
        assert ck.is_pending  # not lost: still running
        gate.set()
        ck.wait()
        assert not ck.is_pending and ck.unreported_failure is None
    finally:
        signal.signal(signal.SIGUSR2, previous)
        gate.set()
        ck.close()
