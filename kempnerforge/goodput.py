"""Where a job's wall-clock time went, from its run ledger (:mod:`kempnerforge.ledger`).

Every millisecond from the first event (or the scheduler's ``SubmitTime`` of the first run) to
the last event gets exactly one label, so the parts add up to ``wall_s``. Times are computed in
integer milliseconds; each part is that count / 1000. Labels, strongest first (where two could
claim the same time, the stronger one has it):

``queue_wait_s``
    Under SLURM only: run 0 from ``SubmitTime`` to ``StartTime``, run k from the end of run k-1
    to its ``StartTime`` (the controller's times, read by the ``start`` event). A restart inside
    one allocation has the job's old ``StartTime``: it has a restart gap instead.
``checkpoint_stall_s``
    The time training was blocked by a save: each ``save`` event's ``blocked_s``, placed at the
    save's start (``t - max(durable_s, blocked_s)``).
``lost_work_s``
    Work that a fault threw away: in a run followed by another one, from the moment it reached
    the step the next run resumed from to the last step it reached (steps between beats are
    interpolated linearly), and for a run that ended without a ``stop`` or ``end`` event (a
    crash, a SIGKILL) on to the run's end: what it did after its last known step was not saved.
``stop_s``
    A run that stopped on purpose (a ``stop`` event): from its last step to the run's end (the
    save on the way out is a checkpoint stall; the rest is agreeing, writing, exiting).
``restart_gap_s``
    Between a run's end and the next run's ``start`` event when the scheduler's start time of
    that run is not known (a local restart, a restart inside a SLURM job: the launcher's
    decision, new processes, imports).
``startup_s``
    From a run's start (``StartTime`` under SLURM, else its ``start`` event) to its
    ``first_step``, loading the checkpoint included; a run without a first step is start-up to
    its end.
``productive_s``
    From a run's ``first_step`` to the last step it reached, less the above: each step counted
    once (the part of a run that was redone later is lost work, not productive).
``other_s``
    The rest: a finished run's teardown, time between runs no event explains.

``goodput`` = productive_s / wall_s. ``lost_steps``: per fault, the last step reached before it
minus the step the next run resumed from (a fresh start resumes from 0); for a fault with no
run after it, minus the last saved step. A fault is a run that ended by ``preemption``,
``crash``, ``hang``, ``node_failure`` (or ``time_limit``); its cost is the wall time from the
moment its run reached the step the next run resumed from to the next run's first step, i.e.
exactly ``lost_work + stop + queue_wait / restart_gap + the next run's startup`` of that stretch
(and any save stall inside it). With no next run the stretch ends at the run's end.

Torch-free: ``kempnerforge report`` and ``--status`` import it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from kempnerforge import ledger

logger = logging.getLogger(__name__)

PARTS = (
    "productive_s",
    "startup_s",
    "checkpoint_stall_s",
    "lost_work_s",
    "queue_wait_s",
    "stop_s",
    "restart_gap_s",
    "other_s",
)
# strongest first
_PRIORITY = {
    "queue_wait_s": 7,
    "checkpoint_stall_s": 6,
    "lost_work_s": 5,
    "stop_s": 4,
    "restart_gap_s": 3,
    "startup_s": 2,
    "productive_s": 1,
    "other_s": 0,  # inside a run: what no other label claims (owned by that run)
}
FAULT_KINDS = (*ledger.FAULTS, ledger.TIME_LIMIT)
_MANAGER_EVENTS = {"first_step", "step", "save", "stop", "end"}
_LAUNCHER_ONLY = {ledger.CRASH, ledger.NODE_FAILURE, ledger.CANCEL}


@dataclass
class Run:
    """One (re)start of the job, as the ledger shows it (rank 0's events and the launcher's)."""

    index: int
    job_id: str | None = None
    restart: int | None = None
    start: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    run_end: dict[str, Any] | None = None
    restart_event: dict[str, Any] | None = None  # the launcher's, that started this run
    launch: dict[str, Any] | None = None  # the launcher's own start, before this run's

    @property
    def stop(self) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e["event"] == "stop"), None)

    @property
    def end(self) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e["event"] == "end"), None)

    @property
    def resumed(self) -> int | None:
        v = (self.start or {}).get("resumed_step")
        return int(v) if isinstance(v, (int, float)) else None

    @property
    def first_step(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == "first_step"), None)

    def times(self) -> list[float]:
        # a ``reached`` event is written by the next run: it speaks of its step's time
        ts = [float(e["step_t" if e["event"] == "reached" else "t"]) for e in self.events]
        for e in (self.launch, self.start, self.run_end):
            if e is not None:
                ts.append(float(e["t"]))
        return ts

    def points(self) -> list[tuple[float, int]]:
        """(time, step) known reached, in time order."""
        pts: list[tuple[float, int]] = []
        for e in self.events:
            kind, step = e["event"], e.get("step")
            if kind in ("first_step", "step") and _num(step):
                pts.append((float(e["t"]), int(step)))
            elif kind == "reached" and _num(step) and _num(e.get("step_t")):
                pts.append((float(e["step_t"]), int(step)))
            elif kind == "save" and _num(step):
                span = max(_f(e.get("durable_s")), _f(e.get("blocked_s")))
                pts.append((float(e["t"]) - span, int(step)))
            elif kind in ("stop", "end"):
                if _num(e.get("last_step")) and _num(e.get("last_step_t")):
                    pts.append((float(e["last_step_t"]), int(e["last_step"])))
                elif _num(step) and self.first_step is not None:
                    pts.append((float(e["t"]), int(step)))
        pts.sort()
        return pts


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _f(v: Any) -> float:
    return float(v) if _num(v) and v > 0 else 0.0


def _matches(run: Run, ev: dict[str, Any]) -> bool:
    job, restart = ev.get("job_id"), ev.get("restart")
    if run.job_id is not None and job is not None and str(job) != run.job_id:
        return False
    return run.restart is None or restart is None or int(restart) == run.restart


def group_runs(events: list[dict[str, Any]]) -> list[Run]:
    """Split the ledger into runs: a ``start`` begins one; the training side's events belong to
    the run begun last; a launcher's ``run_end`` closes the run of its job and restart (a run
    that died before its ``start`` gets a run of its own); a ``restart`` belongs to the next run.
    """
    runs: list[Run] = []
    cur: Run | None = None
    pending: dict[str, Any] | None = None
    launch: dict[str, Any] | None = None

    def new(**kw: Any) -> Run:
        nonlocal pending, launch
        r = Run(index=len(runs), restart_event=pending, launch=launch, **kw)
        pending = launch = None
        runs.append(r)
        return r

    for ev in events:
        kind = ev["event"]
        if kind == "start":
            job, restart = ev.get("job_id"), ev.get("restart")
            cur = new(
                job_id=None if job is None else str(job),
                restart=int(restart) if _num(restart) else None,
                start=ev,
            )
        elif kind == "reached":  # written by the next run, about the one its pid started
            owner = next(
                (r for r in reversed(runs) if (r.start or {}).get("pid") == ev.get("pid")), cur
            )
            if owner is not None:
                owner.events.append(ev)
        elif kind in _MANAGER_EVENTS:
            if cur is None or cur.run_end is not None:
                cur = new()
            cur.events.append(ev)
        elif kind == "run_end":
            if cur is None or cur.run_end is not None or not _matches(cur, ev):
                job, restart = ev.get("job_id"), ev.get("restart")
                cur = new(
                    job_id=None if job is None else str(job),
                    restart=int(restart) if _num(restart) else None,
                )
            cur.run_end = ev
        elif kind == "restart":
            pending = ev
        elif kind == "launch":
            launch = ev
    return runs


def run_reason(run: Run, has_next: bool) -> str:
    """Why a run ended: the launcher's word for what only it sees (crash, node failure,
    cancel), else the training side's (its stop reason, or done), else the launcher's guess from
    the exit codes; a run that left no word and was followed by another one crashed."""
    launcher = ledger.normalize_reason((run.run_end or {}).get("reason"))
    stop, end = run.stop, run.end
    manager = ledger.normalize_reason(stop.get("reason")) if stop else None
    if manager is None and end is not None:
        manager = ledger.DONE
    if launcher in _LAUNCHER_ONLY or (launcher and manager is None):
        return str(launcher)
    if manager:
        return manager
    return ledger.CRASH if has_next else "unknown"


def _interp(points: list[tuple[float, int]], step: int) -> float:
    """When a run reached ``step`` (linear between known points)."""
    if step <= points[0][1]:
        return points[0][0]
    for (t0, s0), (t1, s1) in itertools.pairwise(points):
        if s0 <= step <= s1:
            if s1 == s0:
                return t0
            return t0 + (step - s0) / (s1 - s0) * (t1 - t0)
    return points[-1][0]


@dataclass
class _Span:
    label: str
    a: int
    b: int
    run: int


def compute(events: list[dict[str, Any]], *, job_id: str | None = None) -> dict[str, Any]:
    """The report (see the module docstring) of a ledger's events; ``job_id``: only that job's
    runs (a checkpoint dir can be shared by several submissions)."""
    runs = group_runs(events)
    if job_id is not None:
        runs = [r for r in runs if r.job_id == str(job_id)]
        for i, r in enumerate(runs):
            r.index = i
    if not runs:
        return _empty()
    all_t = [t for r in runs for t in r.times()]
    submit = (runs[0].start or {}).get("submit_time")
    t0 = min(all_t + ([float(submit)] if _num(submit) else []))
    t1 = max(all_t)

    def ms(t: float) -> int:
        return round((t - t0) * 1000)

    spans: list[_Span] = []
    infos: list[dict[str, Any]] = []
    saved_steps: list[int] = []
    windows: list[tuple[str, int, int, int]] = []  # (kind, a, b, run) of each fault
    prev_end: int | None = None
    first_steps: list[int | None] = []
    ends: list[int] = []
    begins: list[int] = []
    reasons = [run_reason(r, i + 1 < len(runs)) for i, r in enumerate(runs)]

    # Pass 1: each run's bounds.
    for i, r in enumerate(runs):
        ts = r.times()
        start_ev = r.start or {}
        begin_t = float(start_ev["t"]) if r.start else min(ts)
        if r.launch is not None:  # the launcher started the processes: start-up from there
            begin_t = min(begin_t, float(r.launch["t"]))
        elif r.restart_event is not None and not _num(start_ev.get("start_time")):
            # restarted by a launcher in place (no queue): the processes start at its restart
            begin_t = min(begin_t, float(r.restart_event["t"]))
        slurm_start = start_ev.get("start_time")
        sub = start_ev.get("submit_time")
        begin = ms(begin_t)
        lo = 0 if prev_end is None else prev_end
        # a StartTime before the previous run ended is the same allocation (a restart inside
        # the job): no queue, the gap is a restart gap (1 s slack: SLURM's times are whole)
        if _num(slurm_start) and (prev_end is None or ms(float(slurm_start)) >= prev_end - 1000):
            q_from = prev_end if prev_end is not None else (ms(float(sub)) if _num(sub) else None)
            s = max(lo, ms(float(slurm_start)))
            if q_from is not None and s > q_from:
                spans.append(_Span("queue_wait_s", q_from, s, i))
            begin = min(max(s, lo), max(begin, lo))
        else:
            begin = max(begin, lo)
            if prev_end is not None and begin > prev_end:
                spans.append(_Span("restart_gap_s", prev_end, begin, i))
        end = max(begin, ms(max(ts)))
        fs = r.first_step
        fs_ms = None if fs is None else min(max(ms(float(fs["t"])), begin), end)
        begins.append(begin)
        ends.append(end)
        first_steps.append(fs_ms)
        prev_end = end

    # Pass 2: inside each run.
    for i, r in enumerate(runs):
        begin, end, fs_ms = begins[i], ends[i], first_steps[i]
        has_next = i + 1 < len(runs)
        reason = reasons[i]
        pts = [(min(max(ms(t), begin), end), s) for t, s in r.points()] if fs_ms is not None else []
        spans.append(_Span("other_s", begin, end, i))
        spans.append(_Span("startup_s", begin, end if fs_ms is None else fs_ms, i))
        last_step = max((s for _, s in pts), default=None)
        t_last = min((t for t, s in pts if s == last_step), default=end)
        if fs_ms is not None:
            spans.append(_Span("productive_s", fs_ms, t_last, i))
        for e in r.events:
            if e["event"] == "save":
                blocked = _f(e.get("blocked_s"))
                a = ms(float(e["t"]) - max(blocked, _f(e.get("durable_s"))))
                b = a + round(blocked * 1000)
                a, b = max(a, begin), min(b, end)
                if b > a:
                    spans.append(_Span("checkpoint_stall_s", a, b, i))
                if _num(e.get("step")):
                    saved_steps.append(int(e["step"]))
        fault = reason in FAULT_KINDS
        redo: int | None = None
        if has_next:
            nxt = runs[i + 1].resumed
            redo = 0 if nxt is None else nxt
        elif fault and last_step is not None:
            done = [s for s in saved_steps if s <= last_step]
            redo = max(done) if done else (r.resumed or 0)
        lost_steps = 0
        t_redo = t_last
        if redo is not None and last_step is not None and redo < last_step:
            lost_steps = last_step - redo
            t_redo = round(_interp(pts, redo))
        quiet_end = r.stop is None and r.end is None
        if redo is not None or (quiet_end and fault):
            lost_to = end if quiet_end else t_last
            if lost_to > t_redo:
                spans.append(_Span("lost_work_s", t_redo, lost_to, i))
        if r.stop is not None and fs_ms is not None and end > t_last:
            spans.append(_Span("stop_s", t_last, end, i))
        if fault:
            w_end = end
            if has_next:
                nfs = first_steps[i + 1]
                w_end = nfs if nfs is not None else ends[i + 1]
            windows.append((reason, t_redo if fs_ms is not None else begin, w_end, i))
        infos.append(
            {
                "reason": reason,
                "last_step": last_step,
                "lost_steps": lost_steps,
                "redo_from": redo if lost_steps else None,
            }
        )

    total = ms(t1)
    per_label, per_run = _sweep(spans, total, len(runs))
    parts = {k: per_label.get(k, 0) / 1000 for k in PARTS}
    faults: dict[str, dict[str, Any]] = {k: {"count": 0, "cost_s": 0.0} for k in FAULT_KINDS}
    covered = 0  # a run that failed during start-up is also the stretch of the fault before it
    for kind, a, b, _run in windows:
        a = max(a, covered)
        covered = max(covered, b)
        faults[kind]["count"] += 1
        faults[kind]["cost_s"] = round(faults[kind]["cost_s"] + max(0, b - a) / 1000, 3)

    run_rows = []
    for i, r in enumerate(runs):
        start_ev = r.start or {}
        end_ev = r.run_end or {}
        codes = end_ev.get("exit_codes")
        code = codes if isinstance(codes, list) else None
        if code is None:
            stop_or_end = r.stop or r.end
            code = (stop_or_end or {}).get("exit_code")
        outcome = end_ev.get("outcome")
        if outcome is None:
            if reasons[i] == ledger.DONE:
                outcome = "done"
            elif i + 1 < len(runs):
                outcome = "restart"
        row: dict[str, Any] = {
            "index": i,
            "job_id": r.job_id,
            "restart": r.restart,
            "host": start_ev.get("host"),
            "world_size": start_ev.get("world_size"),
            "start_t": round(t0 + begins[i] / 1000, 3),
            "end_t": round(t0 + ends[i] / 1000, 3),
            "first_step_t": None
            if first_steps[i] is None
            else round(t0 + first_steps[i] / 1000, 3),
            "resumed_step": r.resumed,
            "first_step": (r.first_step or {}).get("step"),
            "last_step": infos[i]["last_step"],
            "reason": infos[i]["reason"],
            "outcome": outcome,
            "exit_code": code,
            "lost_steps": infos[i]["lost_steps"],
            "saves": sum(1 for e in r.events if e["event"] == "save"),
            "parts": {k: per_run[i].get(k, 0) / 1000 for k in PARTS if per_run[i].get(k)},
        }
        if end_ev.get("rank") is not None:
            row["crash_rank"] = end_ev.get("rank")
        if end_ev.get("node") is not None:
            row["crash_node"] = end_ev.get("node")
        if r.restart_event is not None:
            row["restarted_for"] = {
                k: r.restart_event.get(k) for k in ("reason", "rank", "node", "excluded", "took_s")
            }
        run_rows.append(row)

    wall = total / 1000
    return {
        "wall_s": wall,
        **parts,
        "goodput": round(parts["productive_s"] / wall, 6) if wall > 0 else 0.0,
        "lost_steps": sum(x["lost_steps"] for x in infos),
        "parts": parts,
        "faults": faults,
        "runs": run_rows,
        "start_t": round(t0, 3),
        "end_t": round(t1, 3),
        "first_step": next(
            (r["first_step"] for r in run_rows if r["first_step"] is not None), None
        ),
        "last_step": max(
            (r["last_step"] for r in run_rows if r["last_step"] is not None), default=None
        ),
        "segments": _segments(spans, total),
    }


def _empty() -> dict[str, Any]:
    parts = {k: 0.0 for k in PARTS}
    return {
        "wall_s": 0.0,
        **parts,
        "goodput": 0.0,
        "lost_steps": 0,
        "parts": parts,
        "faults": {k: {"count": 0, "cost_s": 0.0} for k in FAULT_KINDS},
        "runs": [],
        "start_t": None,
        "end_t": None,
        "first_step": None,
        "last_step": None,
        "segments": [],
    }


def _cover(spans: list[_Span], total: int) -> list[tuple[int, int, str, int]]:
    """The elementary stretches of [0, total] with the strongest label on each (run -1: none)."""
    bounds = {0, total}
    for s in spans:
        s.a, s.b = max(0, min(s.a, total)), max(0, min(s.b, total))
        if s.b > s.a:
            bounds.update((s.a, s.b))
    cuts = sorted(bounds)
    live = [s for s in spans if s.b > s.a]
    opens: dict[int, list[_Span]] = {}
    closes: dict[int, list[_Span]] = {}
    for s in live:
        opens.setdefault(s.a, []).append(s)
        closes.setdefault(s.b, []).append(s)
    active: list[_Span] = []
    out = []
    for a, b in itertools.pairwise(cuts):
        for s in closes.get(a, []):
            active.remove(s)
        active.extend(opens.get(a, []))
        if active:
            best = max(active, key=lambda s: (_PRIORITY[s.label], -s.run))
            out.append((a, b, best.label, best.run))
        else:
            out.append((a, b, "other_s", -1))
    return out


def _sweep(
    spans: list[_Span], total: int, nruns: int
) -> tuple[dict[str, int], list[dict[str, int]]]:
    per_label: dict[str, int] = {}
    per_run: list[dict[str, int]] = [{} for _ in range(nruns)]
    for a, b, label, run in _cover(spans, total):
        per_label[label] = per_label.get(label, 0) + (b - a)
        if run >= 0:
            per_run[run][label] = per_run[run].get(label, 0) + (b - a)
    return per_label, per_run


def _segments(spans: list[_Span], total: int) -> list[list[Any]]:
    """[start_s, end_s, label] stretches, neighbours of one label merged (for the plot)."""
    out: list[list[Any]] = []
    for a, b, label, _ in _cover(spans, total):
        if out and out[-1][2] == label and out[-1][1] == a / 1000:
            out[-1][1] = b / 1000
        else:
            out.append([a / 1000, b / 1000, label])
    return out


def report(root: str | os.PathLike[str], *, job_id: str | None = None) -> dict[str, Any]:
    """The report of the ledger in checkpoint dir ``root``."""
    contents = ledger.scan(root)
    rep = compute(contents.events, job_id=job_id)
    rep["dir"] = os.fspath(root)
    rep["events"] = len(contents.events)
    rep["skipped_lines"] = contents.skipped
    if job_id is not None:
        rep["job_id"] = str(job_id)
    return rep


# ------------------------------------------------------------------------------ text
def human_s(s: float) -> str:
    """``3725.0`` -> ``1h02m05s``; short durations stay in seconds."""
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


_LABELS = {
    "productive_s": "productive",
    "startup_s": "startup",
    "checkpoint_stall_s": "checkpoint stall",
    "lost_work_s": "lost work",
    "queue_wait_s": "queue wait",
    "stop_s": "stop",
    "restart_gap_s": "restart gap",
    "other_s": "other",
}


def _code_text(code: Any) -> str:
    if isinstance(code, list):
        return ",".join("?" if c is None else str(c) for c in code)
    return "-" if code is None else str(code)


def text(rep: dict[str, Any]) -> str:
    """A short table: the split of the wall time, the runs, the faults."""
    wall = rep["wall_s"]
    where = rep.get("dir", "")
    if not rep["runs"]:
        return f"{where}: no run ledger events ({ledger.EVENTS_FILE} missing or empty)"
    steps = (
        f"steps {rep['first_step']} -> {rep['last_step']}" if rep["last_step"] is not None else ""
    )
    out = [
        f"goodput report: {where}",
        f"wall {human_s(wall)} ({wall:.1f} s)   goodput {100 * rep['goodput']:.1f}%   "
        f"{len(rep['runs'])} run(s)   {steps}   lost steps {rep['lost_steps']}",
        "",
        f"  {'part':<18}{'seconds':>10}{'share':>8}",
    ]
    for key in PARTS:
        v = rep["parts"][key]
        share = f"{100 * v / wall:.1f}%" if wall > 0 else "-"
        out.append(f"  {_LABELS[key]:<18}{v:>10.1f}{share:>8}")
    out += [
        "",
        f"  {'run':<4}{'restart':>8}  {'start':<9}{'length':>10}  {'resumed':>8}"
        f"{'last':>8}  {'reason':<12}{'exit':<8}{'lost':>6}",
    ]
    for r in rep["runs"]:
        start = time.strftime("%H:%M:%S", time.localtime(r["start_t"]))
        length = human_s(r["end_t"] - r["start_t"])
        resumed = "-" if r["resumed_step"] is None else str(r["resumed_step"])
        last = "-" if r["last_step"] is None else str(r["last_step"])
        restart = "-" if r["restart"] is None else str(r["restart"])
        out.append(
            f"  {r['index']:<4}{restart:>8}  {start:<9}{length:>10}  {resumed:>8}{last:>8}  "
            f"{r['reason']:<12}{_code_text(r['exit_code']):<8}{r['lost_steps']:>6}"
        )
    out += ["", "  faults"]
    for kind, f in rep["faults"].items():
        if f["count"] or kind in ledger.FAULTS:
            out.append(f"  {kind:<14}{f['count']:>3}  cost {f['cost_s']:.1f} s")
    if rep.get("skipped_lines"):
        out.append(f"  ({rep['skipped_lines']} torn or unparsable ledger line(s) skipped)")
    return "\n".join(out)


def summary_line(root: str | os.PathLike[str], job_id: str | None = None) -> str | None:
    """One line for ``--status``; None when the checkpoint dir has no ledger."""
    if not os.path.isfile(ledger.path(root)):
        return None
    rep = report(root, job_id=job_id)
    if not rep["runs"] and job_id is not None:
        rep = report(root)
    if not rep["runs"]:
        return None
    nf = sum(f["count"] for f in rep["faults"].values())
    cost = sum(f["cost_s"] for f in rep["faults"].values())
    p = rep["parts"]
    return (
        f"{100 * rep['goodput']:.1f}% of {human_s(rep['wall_s'])} productive; "
        f"{nf} fault(s) cost {human_s(cost)} ({rep['lost_steps']} steps redone); "
        f"startup {human_s(p['startup_s'])}, checkpoint stalls {human_s(p['checkpoint_stall_s'])}"
        + (f", queue {human_s(p['queue_wait_s'])}" if p["queue_wait_s"] else "")
    )


# ------------------------------------------------------------------------------ plot
_COLORS = {
    "productive_s": "#2ca02c",
    "startup_s": "#1f77b4",
    "checkpoint_stall_s": "#ff7f0e",
    "lost_work_s": "#d62728",
    "queue_wait_s": "#9467bd",
    "stop_s": "#8c564b",
    "restart_gap_s": "#e377c2",
    "other_s": "#c7c7c7",
}


def plot(rep: dict[str, Any], dest: str | os.PathLike[str]) -> None:
    """A timeline PNG: the runs as bars (fault ends marked), the time split by kind below."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as e:
        raise RuntimeError(f"--plot needs matplotlib: pip install matplotlib ({e})") from None
    t0 = rep["start_t"] or 0.0
    fig, ax = plt.subplots(figsize=(11, 3.2))
    for r in rep["runs"]:
        a, b = r["start_t"] - t0, r["end_t"] - t0
        ax.barh(1, max(b - a, 1e-3), left=a, height=0.6, color="#aec7e8", edgecolor="black")
        ax.text(a + (b - a) / 2, 1, f"run {r['index']}", ha="center", va="center", fontsize=8)
        if r["reason"] in FAULT_KINDS:
            ax.plot([b], [1.38], marker="v", color="#d62728", markersize=9)
            ax.text(b, 1.55, r["reason"], ha="center", fontsize=7, color="#d62728")
    for a, b, label in rep["segments"]:
        ax.barh(0, b - a, left=a, height=0.6, color=_COLORS[label], linewidth=0)
    ax.set_yticks([0, 1], ["time", "runs"])
    ax.set_ylim(-0.6, 1.9)
    ax.set_xlabel("seconds since the job's start")
    ax.set_title(
        f"goodput {100 * rep['goodput']:.1f}% of {human_s(rep['wall_s'])}, "
        f"{rep['lost_steps']} steps redone"
    )
    ax.legend(
        handles=[Patch(color=_COLORS[k], label=_LABELS[k]) for k in PARTS if rep["parts"][k]],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.28),
        ncol=8,
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)
