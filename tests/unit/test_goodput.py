"""The goodput report: exact figures from hand-built ledgers on disk, and the CLI around it.

Each ledger is written as the real writers would leave it (one JSON line per event) with chosen
times, so every part of the report can be checked to the millisecond against a hand count.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kempnerforge import goodput, ledger
from kempnerforge.cli import main
from kempnerforge.launch import records

T = 1_700_000_000.0
JOB = "local-3f2a"


class _Writer:
    """Lines of ``events.jsonl`` at chosen times (seconds after ``T``)."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.f = root / ledger.EVENTS_FILE
        self.f.write_text("")

    def __call__(self, t: float, event: str, **fields: Any) -> None:
        for k in ("last_step_t", "submit_time", "eligible_time", "start_time"):
            if k in fields:
                fields[k] = T + fields[k]
        with self.f.open("a") as f:
            f.write(json.dumps({"v": 1, "t": T + t, "event": event, **fields}) + "\n")


def _start(e: _Writer, t: float, restart: int, resumed: int | None, **kw: Any) -> None:
    e(t, "start", job_id=kw.pop("job", JOB), restart=restart, host="n1", pid=100 + restart,
      world_size=2, resumed_step=resumed, who="manager", **kw)  # fmt: skip


def crash_and_two_preemptions(root: Path) -> None:
    """Run 0 preempted (saved its last step), run 1 crashes 100 steps after its last save, run 2
    preempted but its final save is lost (50 steps redone), run 3 finishes."""
    e = _Writer(root)
    _start(e, 0, 0, None)
    e(10, "first_step", step=1)
    e(20, "step", step=100)
    e(30, "step", step=200)
    e(32, "save", step=200, blocked_s=1, durable_s=2, nbytes=10)  # blocked over [30, 31]
    e(40, "step", step=300)
    e(49.8, "save", step=400, blocked_s=0.5, durable_s=0.8, nbytes=10)  # [49, 49.5]
    e(50, "stop", step=400, reason="preemption", exit_code=75, saved="step_400",
      last_step=400, last_step_t=49)  # fmt: skip
    e(51, "run_end", job_id=JOB, restart=0, exit_codes=[75, 75], outcome="restart",
      reason="preemption")  # fmt: skip
    e(51.5, "restart", job_id=JOB, n=1, reason="preemption", rank=None, node=None,
      excluded=None, took_s=0.5)  # fmt: skip
    _start(e, 53, 1, 400)
    e(58, "first_step", step=401)
    e(68, "step", step=500)
    e(78, "step", step=600)
    e(80, "save", step=600, blocked_s=1, durable_s=1, nbytes=10)  # [79, 80]
    e(88, "step", step=700)
    e(95, "run_end", job_id=JOB, restart=1, exit_codes=[1, -15], outcome="restart",
      reason="crash", rank=0, node="n1")  # fmt: skip
    e(95.2, "restart", job_id=JOB, n=2, reason="crash", rank=0, node="n1", excluded=None,
      took_s=3.1)  # fmt: skip
    _start(e, 97, 2, 600)
    e(102, "first_step", step=601)
    e(112, "step", step=700)
    e(122, "step", step=800)
    e(126, "stop", step=850, reason="preemption-signal", exit_code=75, saved="none",
      last_step=850, last_step_t=124)  # fmt: skip
    e(127, "run_end", job_id=JOB, restart=2, exit_codes=[75, 75], outcome="restart",
      reason="preemption")  # fmt: skip
    e(127.1, "restart", job_id=JOB, n=3, reason="preemption", rank=None, node=None,
      excluded=None, took_s=0.2)  # fmt: skip
    _start(e, 130, 3, 800)
    e(135, "first_step", step=801)
    e(145, "step", step=900)
    e(150, "end", step=1000, exit_code=0, last_step=1000, last_step_t=149)
    e(151, "run_end", job_id=JOB, restart=3, exit_codes=[0, 0], outcome="done", reason="done")


# By hand, run by run (seconds after T):
#   run 0: startup 0-10, productive 10-49 less the stall 30-31, stop 49-51 less the stall
#          49-49.5                                     -> startup 10, prod 38, stall 1.5, stop 1.5
#   gap 51-53: the launcher's restart at 51.5 starts the processes
#                                                      -> restart gap 0.5, startup 1.5
#   run 1: startup 53-58, productive 58-78, step 600 (resumed next) reached at 78: lost 78-95
#          (no stop: the tail is lost too) less the stall 79-80 -> 5, 20, stall 1, lost 16
#   gap 95-97 (restart at 95.2)                        -> gap 0.2, startup 1.8
#   run 2: startup 97-102, productive 102-122, step 800 at 122: lost 122-124, stop 124-127
#                                                      -> 5, 20, lost 2, stop 3
#   gap 127-130 (restart at 127.1)                     -> gap 0.1, startup 2.9
#   run 3: startup 130-135, productive 135-149, other 149-151 -> 5, 14, other 2
EXPECTED = {
    "productive_s": 92.0,
    "startup_s": 31.2,
    "checkpoint_stall_s": 2.5,
    "lost_work_s": 18.0,
    "queue_wait_s": 0.0,
    "stop_s": 4.5,
    "restart_gap_s": 0.8,
    "other_s": 2.0,
}


def test_crash_and_two_preemptions_exact(tmp_path: Path) -> None:
    crash_and_two_preemptions(tmp_path)
    rep = goodput.report(tmp_path)
    assert rep["wall_s"] == 151.0
    assert rep["parts"] == EXPECTED
    assert sum(rep["parts"].values()) == rep["wall_s"]
    assert {k: rep[k] for k in EXPECTED} == EXPECTED  # also at the top level
    assert rep["goodput"] == pytest.approx(92 / 151, abs=1e-6)
    assert rep["lost_steps"] == 150  # 700 - 600 after the crash, 850 - 800 after run 2
    assert [r["lost_steps"] for r in rep["runs"]] == [0, 100, 50, 0]
    assert [r["reason"] for r in rep["runs"]] == ["preemption", "crash", "preemption", "done"]
    assert [r["exit_code"] for r in rep["runs"]] == [[75, 75], [1, -15], [75, 75], [0, 0]]
    assert [r["resumed_step"] for r in rep["runs"]] == [None, 400, 600, 800]
    assert [r["last_step"] for r in rep["runs"]] == [400, 700, 850, 1000]
    assert rep["runs"][1]["crash_rank"] == 0 and rep["runs"][1]["crash_node"] == "n1"
    assert rep["runs"][2]["restarted_for"]["reason"] == "crash"
    assert rep["runs"][2]["restarted_for"]["took_s"] == 3.1
    assert [round(r["start_t"] - T, 3) for r in rep["runs"]] == [0, 51.5, 95.2, 127.1]
    assert [r["end_t"] - T for r in rep["runs"]] == [51, 95, 127, 151]
    # cost: from the step the next run resumed from to the next run's first step
    assert rep["faults"]["preemption"] == {"count": 2, "cost_s": 22.0}  # 49->58, 122->135
    assert rep["faults"]["crash"] == {"count": 1, "cost_s": 24.0}  # 78 -> 102
    assert rep["faults"]["hang"] == {"count": 0, "cost_s": 0.0}
    assert rep["faults"]["node_failure"] == {"count": 0, "cost_s": 0.0}
    per_run = [r["parts"] for r in rep["runs"]]
    assert per_run[1] == {
        "productive_s": 20.0,
        "startup_s": 6.5,
        "checkpoint_stall_s": 1.0,
        "lost_work_s": 16.0,
        "restart_gap_s": 0.5,
    }
    assert sum(sum(p.values()) for p in per_run) == rep["wall_s"]
    segs = rep["segments"]
    assert segs[0] == [0.0, 10.0, "startup_s"] and segs[-1] == [149.0, 151.0, "other_s"]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(segs))


def test_queue_wait_under_slurm(tmp_path: Path) -> None:
    """Run 0 queued 30 s after submission, run 1 (requeued) 60 s after run 0 ended."""
    e = _Writer(tmp_path)
    job = "4242"
    _start(e, 33, 0, None, job=job, submit_time=0, eligible_time=0, start_time=30)
    e(40, "first_step", step=1)
    e(60, "stop", step=20, reason="preemption", exit_code=75, saved="step_20",
      last_step=20, last_step_t=59)  # fmt: skip
    e(61, "run_end", job_id=job, restart=0, exit_codes=[75, None], outcome="restart",
      reason="preemption")  # fmt: skip
    # the controller reset SubmitTime at the requeue; run 1's wait counts from run 0's end
    _start(e, 124, 1, 20, job=job, submit_time=61, eligible_time=100, start_time=121)
    e(130, "first_step", step=21)
    e(140, "end", step=30, exit_code=0, last_step=30, last_step_t=140)
    rep = goodput.report(tmp_path, job_id=job)
    assert rep["wall_s"] == 140.0  # from run 0's SubmitTime
    p = rep["parts"]
    assert p["queue_wait_s"] == 90.0  # 0 -> 30, 61 -> 121
    assert p["startup_s"] == 10.0 + 9.0  # StartTime -> first step: 30 -> 40, 121 -> 130
    assert p["productive_s"] == 19.0 + 10.0
    assert p["stop_s"] == 2.0 and p["restart_gap_s"] == 0.0
    assert sum(p.values()) == rep["wall_s"]
    assert rep["runs"][0]["exit_code"] == [75, None]
    assert rep["faults"]["preemption"] == {"count": 1, "cost_s": 71.0}  # 59 -> 130
    assert goodput.report(tmp_path, job_id="other")["runs"] == []


def test_a_restart_inside_one_allocation_has_no_queue_wait(tmp_path: Path) -> None:
    """Both runs carry the job's one StartTime: the second run's wait is a restart gap."""
    e = _Writer(tmp_path)
    _start(e, 12, 0, None, job="99", submit_time=0, start_time=10)
    e(20, "first_step", step=1)
    e(30, "run_end", job_id="99", restart=0, exit_codes=[1], outcome="restart", reason="crash")
    _start(e, 34, 0, 1, job="99", submit_time=0, start_time=10)
    e(40, "first_step", step=2)
    e(50, "end", step=9, exit_code=0, last_step=9, last_step_t=50)
    p = goodput.report(tmp_path)["parts"]
    assert p["queue_wait_s"] == 10.0 and p["restart_gap_s"] == 4.0
    assert p["startup_s"] == 10.0 + 6.0 and sum(p.values()) == 50.0


def test_a_sigkill_without_launcher_is_a_crash_with_its_tail_lost(tmp_path: Path) -> None:
    """A run killed with no launcher to say so: the next start shows it; what it did after its
    last heartbeat (and since the step the next run resumed from) is lost."""
    e = _Writer(tmp_path)
    _start(e, 0, 0, None, job="run:a")
    e(5, "first_step", step=1)
    e(15, "step", step=11)
    e(16, "save", step=11, blocked_s=0.5, durable_s=0.5, nbytes=1)  # [15.5, 16]
    e(25, "step", step=21)
    e(35, "step", step=31)  # killed around t=40
    _start(e, 41, 0, 11, job="run:b")
    e(45, "first_step", step=12)
    e(55, "end", step=40, exit_code=0, last_step=40, last_step_t=55)
    with (tmp_path / ledger.EVENTS_FILE).open("ab") as f:
        f.write(b'{"v":1,"t":1700000056.0,"event":"st')  # a torn last line
    rep = goodput.report(tmp_path)
    assert rep["skipped_lines"] == 1 and len(rep["runs"]) == 2
    r0 = rep["runs"][0]
    assert r0["reason"] == "crash" and r0["outcome"] == "restart" and r0["exit_code"] is None
    assert rep["lost_steps"] == 20  # 31 - 11
    # step 11 reached at 15 (the save's start); lost 15 -> 35 (last step) -> 35 (run end) less
    # the stall 15.5-16
    p = rep["parts"]
    assert p["lost_work_s"] == 19.5 and p["checkpoint_stall_s"] == 0.5
    assert p["productive_s"] == 10.0 + 10.0  # 5 -> 15, 45 -> 55
    assert p["restart_gap_s"] == 6.0 and p["startup_s"] == 5.0 + 4.0
    assert sum(p.values()) == rep["wall_s"] == 55.0
    assert rep["faults"]["crash"] == {"count": 1, "cost_s": 30.0}  # 15 -> 45


def test_a_run_that_died_before_its_start_event(tmp_path: Path) -> None:
    e = _Writer(tmp_path)
    _start(e, 0, 0, None)
    e(2, "first_step", step=1)
    e(12, "step", step=10)
    e(13, "run_end", job_id=JOB, restart=0, exit_codes=[1], outcome="restart", reason="crash",
      rank=0, node="n1")  # fmt: skip
    e(13.5, "restart", job_id=JOB, n=1, reason="crash", rank=0, node="n1", excluded=None,
      took_s=0.5)  # fmt: skip
    e(16, "run_end", job_id=JOB, restart=1, exit_codes=[1], outcome="stop", reason="crash",
      rank=0, node="n1")  # fmt: skip
    rep = goodput.report(tmp_path)
    assert [r["restart"] for r in rep["runs"]] == [0, 1]
    assert [r["reason"] for r in rep["runs"]] == ["crash", "crash"]
    assert rep["runs"][1]["resumed_step"] is None and rep["runs"][1]["last_step"] is None
    assert rep["lost_steps"] == 10  # no checkpoint: everything is to be redone
    assert rep["faults"]["crash"]["count"] == 2
    assert rep["faults"]["crash"]["cost_s"] == 14.0  # 2 (step 0 at first step) -> 16
    assert sum(rep["parts"].values()) == rep["wall_s"] == 16.0


def test_empty_and_missing_ledgers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = goodput.report(tmp_path)
    assert rep["runs"] == [] and rep["wall_s"] == 0.0 and sum(rep["parts"].values()) == 0
    assert main(["report", str(tmp_path)]) == 1
    assert "no run ledger (events.jsonl)" in capsys.readouterr().err
    assert goodput.summary_line(tmp_path) is None


# ------------------------------------------------------------------------------ the CLI
def test_report_json_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crash_and_two_preemptions(tmp_path)
    assert main(["report", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["parts"] == EXPECTED and rep["lost_steps"] == 150 and rep["wall_s"] == 151.0
    assert rep["dir"] == str(tmp_path) and rep["events"] == 30
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "goodput 60.9%" in out and "lost steps 150" in out
    assert "productive" in out and "92.0" in out and "lost work" in out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.strip()}
    assert lines["preemption"][1] == "2" and lines["crash"][1:4] == ["1", "cost", "24.0"]
    run1 = next(ln.split() for ln in out.splitlines() if ln.split()[:2] == ["1", "1"])
    assert run1[-3:] == ["crash", "1,-15", "100"]


def test_report_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    crash_and_two_preemptions(tmp_path / "ck")
    png = tmp_path / "timeline.png"
    assert main(["report", str(tmp_path / "ck"), "--plot", str(png)]) == 0
    assert f"timeline: {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_report_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path) -> None:
    crash_and_two_preemptions(tmp_path / "ck")
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
        "from kempnerforge.cli import main\n"
        f"sys.exit(main(['report', {str(tmp_path / 'ck')!r}, '--plot', 'x.png']))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 1 and "pip install matplotlib" in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_report_of_a_job_id_and_status_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job id finds its checkpoint dir through the launcher's job record, as --status does."""
    from kempnerforge.launch.slurm.report import status

    ck = tmp_path / "ck"
    crash_and_two_preemptions(ck)
    folder = tmp_path / "logs"
    rec = {"job_id": JOB, "mode": "local", "state": "COMPLETED", "restarts": 3, "pid": 1,
           "checkpoint_dir": str(ck), "folder": str(folder), "exit_code": 0}  # fmt: skip
    records.write_json(records.job_record_path(folder, JOB), rec)
    monkeypatch.chdir(tmp_path)
    assert main(["report", JOB, "--folder", str(folder), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["job_id"] == JOB and rep["parts"] == EXPECTED
    assert main(["report", "local-nope", "--folder", str(folder)]) == 1
    assert "no launcher record of a job local-nope" in capsys.readouterr().err
    # the default place, ./runs/local, without --folder
    records.write_json(records.job_record_path(tmp_path / "runs" / "local", JOB), rec)
    assert main(["report", JOB]) == 0
    assert "goodput 60.9%" in capsys.readouterr().out
    records.write_json(
        records.job_record_path(folder, "local-nock"), {**rec, "checkpoint_dir": None}
    )
    assert main(["report", "local-nock", "--folder", str(folder)]) == 1
    assert "names no checkpoint dir" in capsys.readouterr().err

    assert status(JOB, str(folder)) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "goodput:" in ln)
    assert "60.9% of 2m31s productive; 3 fault(s) cost 46.0s (150 steps redone)" in line
