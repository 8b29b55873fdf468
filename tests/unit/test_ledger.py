"""The run ledger (``events.jsonl``): real files, real processes, a real launcher.

Concurrent writers are separate processes appending to one file; a torn line is bytes cut short
on disk; the launcher test runs ``python -m kempnerforge.launch --local`` over a script that is
preempted, crashes, then finishes. ``scontrol`` is a small script on PATH (no SLURM here).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kempnerforge import ledger
from kempnerforge.ledger import Ledger


def _no_job_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(("SLURM_", "KEMPNERFORGE_", "TORCHELASTIC_")) or k in (
            "RANK",
            "WORLD_SIZE",
        ):
            monkeypatch.delenv(k, raising=False)


def test_append_writes_one_json_line_0600(tmp_path: Path) -> None:
    root = tmp_path / "ck"  # not there yet: append creates it
    before = time.time()
    ledger.append(root, "save", step=3, blocked_s=0.5)
    ledger.append(root, "stop", durable=True, step=4, reason="preemption")
    raw = (root / ledger.EVENTS_FILE).read_bytes()
    assert raw.count(b"\n") == 2 and raw.endswith(b"\n")
    first, second = (json.loads(x) for x in raw.splitlines())
    assert first["v"] == 1 and first["event"] == "save" and first["step"] == 3
    assert before <= first["t"] <= second["t"] <= time.time()
    assert second == {**second, "event": "stop", "step": 4, "reason": "preemption"}
    assert stat.S_IMODE((root / ledger.EVENTS_FILE).stat().st_mode) == 0o600
    assert ledger.read(root) == [first, second]


_WRITER = textwrap.dedent(
    """
    import sys
    from kempnerforge import ledger
    root, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pad = who * (1500 + 700 * (int(who[-1]) % 3))  # lines of 1.5 to 3 KB, below PIPE_BUF
    for i in range(n):
        ledger.append(root, "step", who=who, i=i, pad=pad)
    """
)


def test_concurrent_appends_from_processes_keep_every_line_whole(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    n, writers = 400, [f"w{k}" for k in range(4)]
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path), w, str(n)]) for w in writers
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * len(writers)
    contents = ledger.scan(tmp_path)
    assert contents.skipped == 0 and not contents.torn_last
    assert len(contents.events) == n * len(writers)
    for w in writers:
        mine = [e for e in contents.events if e["who"] == w]
        assert [e["i"] for e in mine] == list(range(n))  # each writer's lines whole, in order
        assert all(e["pad"] == mine[0]["pad"] and e["pad"].startswith(w) for e in mine)


def test_a_torn_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    ledger.append(tmp_path, "start", world_size=1)
    ledger.append(tmp_path, "step", step=10)
    f = tmp_path / ledger.EVENTS_FILE
    whole = f.read_bytes()
    f.write_bytes(whole + b'{"v":1,"t":1.5,"event":"st')  # a write cut short
    contents = ledger.scan(tmp_path)
    assert contents.torn_last and contents.skipped == 1
    assert [e["event"] for e in contents.events] == ["start", "step"]
    # the next writer's line lands glued to the torn one: it is still read
    ledger.append(tmp_path, "stop", step=12)
    contents = ledger.scan(tmp_path)
    assert not contents.torn_last and contents.skipped == 1
    assert [e["event"] for e in contents.events] == ["start", "step", "stop"]
    f.write_bytes(whole + b"not json\n" + b'["a list"]\n' + b'{"event":"x"}\n')
    assert ledger.scan(tmp_path).skipped == 3
    assert ledger.read(tmp_path)[-1]["step"] == 10
    assert ledger.read(tmp_path / "nowhere") == []


def test_append_never_raises_and_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ledger, "_warned", False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="kempnerforge.ledger"):
        ledger.append(blocker, "step", step=1)  # its "directory" is a file
        ledger.append(blocker / "deeper", "step", step=2)
        Ledger(blocker).stop(3, reason="preemption", exit_code=75, saved="none")
    warnings = [r for r in caplog.records if r.name == "kempnerforge.ledger"]
    assert len(warnings) == 1 and "cannot append 'step'" in warnings[0].getMessage()


def test_only_rank_0_writes(tmp_path: Path) -> None:
    lg = Ledger(tmp_path, rank=1, beat_s=0)
    lg.start(world_size=2, resumed_step=None)
    lg.first_step(1)
    lg.step_reached(2)
    lg.save(2, blocked_s=0.1, durable_s=0.2, nbytes=1)
    lg.end(2, exit_code=0)
    assert not (tmp_path / ledger.EVENTS_FILE).exists()


def test_start_says_who_and_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_job_env(monkeypatch)
    monkeypatch.setenv("KEMPNERFORGE_JOB_ID", "job-7")
    monkeypatch.setenv("KEMPNERFORGE_RESTART_COUNT", "2")
    Ledger(tmp_path).start(world_size=4, resumed_step=120, who="own_loop")
    (ev,) = ledger.read(tmp_path)
    assert ev["event"] == "start" and ev["job_id"] == "job-7" and ev["restart"] == 2
    assert ev["pid"] == os.getpid() and ev["world_size"] == 4 and ev["resumed_step"] == 120
    assert ev["who"] == "own_loop" and ev["host"]
    assert "submit_time" not in ev  # not under SLURM: no controller to ask


def test_step_heartbeat_at_most_every_beat_s(tmp_path: Path) -> None:
    lg = Ledger(tmp_path, beat_s=0.2)
    lg.start(world_size=1, resumed_step=None)
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < 1.0:
        step += 1
        lg.step_reached(step)  # the first call stands in for first_step
        time.sleep(0.005)
    last_call = time.time()
    lg.first_step(999)  # once per Ledger: ignored
    lg.stop(step, reason="preemption", exit_code=75, saved=f"step_{step}")
    events = ledger.read(tmp_path)
    kinds = [e["event"] for e in events]
    assert kinds.count("first_step") == 1 and events[1] == {**events[1], "step": 1}
    beats = [e for e in events if e["event"] == "step"]
    assert 3 <= len(beats) <= 6, len(beats)  # ~1 s / 0.2 s, never one per step
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(beats)]
    assert all(g >= 0.19 for g in gaps), gaps
    stop = events[-1]
    assert stop["event"] == "stop" and stop["last_step"] == step
    assert abs(stop["last_step_t"] - last_call) < 0.05


def test_queue_times_from_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_job_env(monkeypatch)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        "#!/bin/sh\n"
        'echo "$@" > "$(dirname "$0")/args"\n'
        'echo "JobId=$4 JobName=x SubmitTime=2024-05-01T12:00:03 '
        "EligibleTime=2024-05-01T12:00:05 AccrueTime=Unknown StartTime=2024-05-01T12:01:00 "
        'EndTime=Unknown"\n'
    )
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    Ledger(tmp_path / "ck").start(world_size=1, resumed_step=5)
    (ev,) = ledger.read(tmp_path / "ck")
    assert (bin_dir / "args").read_text().split() == ["show", "job", "-o", "4242"]
    at = time.mktime(time.strptime("2024-05-01T12:00:03", "%Y-%m-%dT%H:%M:%S"))
    assert ev["job_id"] == "4242" and ev["restart"] == 1
    assert ev["submit_time"] == at and ev["eligible_time"] == at + 2
    assert ev["start_time"] == at + 57
    # a controller that does not answer: the start is written all the same
    scontrol.write_text("#!/bin/sh\necho 'slurm_load_jobs error' >&2\nexit 1\n")
    Ledger(tmp_path / "ck2").start(world_size=1, resumed_step=None)
    (ev,) = ledger.read(tmp_path / "ck2")
    assert ev["event"] == "start" and "start_time" not in ev


def test_restart_text_and_reasons() -> None:
    assert ledger.restart_text(2, "node_failure") == "in-job restart 2: reason=node-failure"
    assert ledger.normalize_reason("preemption-signal") == "preemption"
    assert ledger.normalize_reason("time-limit") == "time_limit"
    assert ledger.normalize_reason("user-cancel") == "cancel"
    assert ledger.reason_of_code(77) == "hang" and ledger.reason_of_code(1) == "crash"


# ------------------------------------------------------------------------------ retention
def test_pruning_keeps_the_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from _reliability_fixtures import tiny_model, write_checkpoint

    from kempnerforge.checkpoint.commit import Retention
    from kempnerforge.cli import main

    root = tmp_path / "ck"
    for step in (2, 4, 6, 8):
        model, opt = tiny_model(step)
        last = write_checkpoint(root, step, model, opt)
        ledger.append(root, "save", step=step, blocked_s=0.1, durable_s=0.1, nbytes=1)
    before = (root / ledger.EVENTS_FILE).read_bytes()
    Retention(root, keep_last_n=2, save_timeout_s=60).prune(last, set())
    assert sorted(p.name for p in root.glob("step_*")) == ["step_6", "step_8"]
    assert main(["ckpt", "prune", str(root), "--keep", "1"]) == 0
    assert "removed step_6" in capsys.readouterr().out
    assert sorted(p.name for p in root.glob("step_*")) == ["step_8"]
    assert (root / ledger.EVENTS_FILE).read_bytes() == before


# ------------------------------------------------------------------------------ the launcher
_TRAINER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from kempnerforge.ledger import Ledger

    root = Path(sys.argv[1])
    restart = int(os.environ["KEMPNERFORGE_RESTART_COUNT"])
    rank = int(os.environ["RANK"])
    lg = Ledger(root, rank=rank, beat_s=0)
    resumed = {0: None, 1: 10, 2: 20}[restart]
    lg.start(world_size=int(os.environ["WORLD_SIZE"]), resumed_step=resumed)
    base = resumed or 0
    for s in range(base + 1, base + 11):
        lg.step_reached(s)


    def commit(step):
        d = root / f"step_{step}"
        (d / "train_state").mkdir(parents=True, exist_ok=True)
        (d / ".metadata").write_bytes(b"")
        (d / "train_state" / "rank_00000.pt").write_bytes(b"")
        (d / "metadata.json").write_text(json.dumps({"step": step}))
        (root / ".latest.tmp").unlink(missing_ok=True)
        (root / ".latest.tmp").symlink_to(d.name)
        os.replace(root / ".latest.tmp", root / "latest")


    if restart == 0:  # preempted: saved step 10, asks for another run
        if rank == 0:
            commit(10)
            lg.save(10, blocked_s=0.01, durable_s=0.01, nbytes=1)
        lg.stop(10, reason="preemption", exit_code=75, saved="step_10")
        sys.exit(75)
    if restart == 1:  # saves step 20, goes on, then rank 0 crashes
        if rank == 0:
            commit(20)
            lg.save(20, blocked_s=0.01, durable_s=0.01, nbytes=1)
            raise RuntimeError("boom")
        sys.exit(0)
    lg.end(30, exit_code=0)
    """
)


def test_local_launcher_writes_run_end_and_restart(tmp_path: Path) -> None:
    (tmp_path / "trainer.py").write_text(_TRAINER)
    ck = tmp_path / "ck"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "KEMPNERFORGE_"))}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "kempnerforge.launch",
            "--local",
            "--tasks-per-node",
            "2",
            "--checkpoint-dir",
            str(ck),
            "--requeue-on-crash",
            "--",
            sys.executable,
            str(tmp_path / "trainer.py"),
            str(ck),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    events = ledger.read(ck)
    kinds = [e["event"] for e in events]
    launcher = [e for e in events if e["event"] in ("run_end", "restart")]
    assert [e["event"] for e in launcher] == [
        "run_end",
        "restart",
        "run_end",
        "restart",
        "run_end",
    ], kinds
    end0, rs1, end1, rs2, end2 = launcher
    job = end0["job_id"]
    assert job.startswith("local-") and {e["job_id"] for e in launcher} == {job}
    assert end0["restart"] == 0 and end0["exit_codes"] == [75, 75]
    assert end0["outcome"] == "restart" and end0["reason"] == "preemption"
    assert rs1["n"] == 1 and rs1["reason"] == "preemption" and rs1["rank"] is None
    assert end1["restart"] == 1 and end1["exit_codes"][0] == 1
    assert end1["reason"] == "crash" and end1["rank"] == 0 and end1["node"]
    assert rs2["n"] == 2 and rs2["reason"] == "crash" and rs2["rank"] == 0
    assert all(isinstance(r["took_s"], float) and r["took_s"] >= 0 for r in (rs1, rs2))
    assert end2 == {**end2, "restart": 2, "exit_codes": [0, 0], "outcome": "done"}
    assert end2["reason"] == "done"
    starts = [e for e in events if e["event"] == "start"]
    assert [(s["job_id"], s["restart"]) for s in starts] == [(job, 0), (job, 1), (job, 2)]
    # every run's end comes after its own events and before the next run's start
    assert kinds[0] == "launch"  # the launcher's own start comes first
    assert kinds.index("run_end") < kinds.index("start", kinds.index("start") + 1)

    from kempnerforge import goodput

    rep = goodput.report(ck)
    assert [r["reason"] for r in rep["runs"]] == ["preemption", "crash", "done"]
    assert [r["exit_code"] for r in rep["runs"]] == [[75, 75], end1["exit_codes"], [0, 0]]
    assert rep["runs"][1]["last_step"] == 20 and rep["runs"][2]["resumed_step"] == 20
    assert rep["faults"]["preemption"]["count"] == 1 and rep["faults"]["crash"]["count"] == 1
    assert rep["lost_steps"] == 0
    assert sum(rep["parts"].values()) == pytest.approx(rep["wall_s"], abs=1e-6)
    # the launcher's restart starts the next run's start-up (new processes, imports)
    assert rep["runs"][1]["parts"]["startup_s"] > 0 and rep["runs"][2]["parts"]["startup_s"] > 0


def test_local_launcher_without_a_checkpoint_dir_writes_nothing(tmp_path: Path) -> None:
    script = tmp_path / "done.py"
    script.write_text("import sys; sys.exit(0)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "KEMPNERFORGE_"))}
    res = subprocess.run(
        [sys.executable, "-m", "kempnerforge.launch", "--local", "--", sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert not list(tmp_path.rglob(ledger.EVENTS_FILE))


def test_slurm_wrapper_rank_0_writes_its_runs_end(tmp_path: Path) -> None:
    """The wrapper's rank-0 ledger step, called directly with real exit records of the other
    ranks on disk (submitit's job environment exists only inside a SLURM job; the SLURM tests run
    the whole wrapper)."""
    from types import SimpleNamespace

    from kempnerforge.launch import records
    from kempnerforge.launch.progress import CrashDecision
    from kempnerforge.launch.slurm.wrapper import SlurmTask

    folder, ck = tmp_path / "logs", tmp_path / "ck"
    paths = SimpleNamespace(folder=folder)
    for rank, code in ((1, 75), (2, -9)):  # rank 3 has not written its record yet
        rec = records.exit_record("77", 0, rank, code, [])
        records.write_json(records.exit_record_path(folder, "77", 0, rank), rec)
    task = SlurmTask(["true"], ["USR1"], checkpoint_dir=str(ck), requeue_on_crash=True)
    task._ledger(4, "77", 0, "n1", 75, None, paths)
    task._ledger(4, "77", 1, "n2", 1, CrashDecision(True, "the resume step advanced"), paths)
    task._ledger(4, "77", 2, "n2", 0, None, paths)
    events = ledger.read(ck)
    assert [e["event"] for e in events] == [
        "run_end",
        "restart",
        "run_end",
        "restart",
        "run_end",
    ]
    end0, rs1, end1, rs2, end2 = events
    assert end0["exit_codes"] == [75, 75, -9, None] and end0["outcome"] == "restart"
    assert end0["reason"] == "preemption" and "rank" not in end0
    assert rs1 == {**rs1, "job_id": "77", "n": 1, "reason": "preemption"}
    assert end1["exit_codes"] == [1, None, None, None] and end1["reason"] == "crash"
    assert end1["rank"] == 0 and end1["node"] == "n2" and end1["outcome"] == "restart"
    assert rs2 == {**rs2, "n": 2, "reason": "crash", "rank": 0, "node": "n2"}
    assert end2 == {**end2, "restart": 2, "outcome": "done", "reason": "done"}
    SlurmTask(["true"], ["USR1"])._ledger(1, "78", 0, "n1", 0, None, paths)  # no dir: nothing
    assert len(ledger.read(ck)) == 5
