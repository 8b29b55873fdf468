"""Independent SLURM cases, run at once: each driven in its own thread, each test reads its own.

A SLURM case spends most of its time waiting (startup, a requeue's delay, a time limit, a hang
threshold), so the cases run side by side instead of one after another. A test module registers
a driver per case with :func:`case`; the driver submits its job(s) into its own directory,
injects its fault as soon as its job gets there (a thread per case: a slow step of one case
never delays another's), waits for the end and returns what the test asserts on. The test is
marked ``@pytest.mark.slurm_case(NAME)`` and calls ``campaign.outcome(NAME)``; the first such
test to run starts every case that the selected tests need (``NAME`` may hold ``{param}``
fields, filled from the test's parameters).

Cases that change what other jobs see (a node set DOWN, a partition preemption) are
``isolated``: each gets a pair of nodes of partition ``isolated`` to itself, one case per pair
at a time, and pins its jobs there (:meth:`Place.submit_options`, :meth:`Place.sbatch_options`).
Every other case shares the nodes of the default partition with the rest. Cases registered
``long`` (a time limit to run into, several runs) start first, so that their waiting overlaps
the others' work instead of coming after it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _slurm_tools import ISOLATED

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Place:
    """Where a case runs: its own directory, and for an isolated case its own nodes."""

    dir: Path
    nodes: tuple[str, ...] = ()

    def submit_options(self) -> list[str]:
        """``submit.py`` options that keep the job on this case's nodes (none when shared)."""
        if not self.nodes:
            return []
        return ["--partition", ISOLATED, "--sbatch", f"nodelist={','.join(self.nodes)}"]

    def sbatch_options(self) -> list[str]:
        if not self.nodes:
            return []
        return [f"--partition={ISOLATED}", f"--nodelist={','.join(self.nodes)}"]


@dataclass(frozen=True)
class Case:
    name: str
    drive: Callable[[Place], Any]
    isolated: bool
    long: bool


CASES: dict[str, Case] = {}


def case(
    name: str, *, isolated: bool = False, long: bool = False
) -> Callable[[Callable[[Place], Any]], Any]:
    """Register ``drive(place) -> outcome`` as the driver of case ``name``."""

    def register(drive: Callable[[Place], Any]) -> Callable[[Place], Any]:
        if name in CASES and CASES[name].drive is not drive:
            raise ValueError(f"two SLURM cases named {name!r}")
        CASES[name] = Case(name, drive, isolated, long)
        return drive

    return register


class _Run:
    """One case's thread and what came of it."""

    def __init__(self, case: Case, place_dir: Path) -> None:
        self.case = case
        self.dir = place_dir
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.started: float | None = None  # when it got its nodes (isolated) or began
        self.ended: float | None = None


class Campaign:
    """Runs ``names`` (registered cases) at once under ``root``; ``pairs`` are the node pairs
    isolated cases take turns on."""

    def __init__(self, root: Path, names: Iterable[str], pairs: Sequence[tuple[str, ...]]):
        unknown = sorted(set(names) - set(CASES))
        if unknown:
            raise KeyError(f"no SLURM case registered as {unknown}")
        self.root = root
        self.t0 = time.monotonic()
        self._runs = {n: _Run(CASES[n], root / n) for n in sorted(set(names))}
        self._pairs: queue.Queue[tuple[str, ...]] = queue.Queue()
        for p in pairs:
            self._pairs.put(tuple(p))
        if not pairs and any(r.case.isolated for r in self._runs.values()):
            raise RuntimeError("isolated cases need at least one node pair")

    def start(self) -> Campaign:
        # Isolated cases first (each waits for a pair no longer than it must), then long ones.
        order = sorted(self._runs.values(), key=lambda r: (not r.case.isolated, not r.case.long))
        for r in order:
            threading.Thread(target=self._drive, args=(r,), name=r.case.name, daemon=True).start()
        return self

    def _drive(self, r: _Run) -> None:
        r.dir.mkdir(parents=True, exist_ok=True)
        pair: tuple[str, ...] = ()
        try:
            if r.case.isolated:
                pair = self._pairs.get()
            r.started = time.monotonic()
            r.value = r.case.drive(Place(r.dir, pair))
        except BaseException as e:  # handed to the test that asks for this case
            r.error = e
        finally:
            if pair:
                self._pairs.put(pair)
            r.ended = time.monotonic()
            r.done.set()
            logger.info(
                "SLURM case %s ended: %s", r.case.name, "ok" if r.error is None else r.error
            )

    def outcome(self, name: str, timeout: float = 900) -> Any:
        """What case ``name``'s driver returned, once it has; its exception, raised here."""
        if name not in self._runs:
            raise KeyError(f"SLURM case {name!r} was not started: is its test marked slurm_case?")
        r = self._runs[name]
        if not r.done.wait(timeout):
            raise TimeoutError(f"SLURM case {name!r} did not end within {timeout:.0f}s")
        if r.error is not None:
            raise r.error
        return r.value

    def timeline(self) -> list[str]:
        """One line per case: when it began and ended, in seconds since the campaign started."""
        out = []
        for name, r in sorted(self._runs.items(), key=lambda kv: kv[1].ended or float("inf")):
            if r.started is None or r.ended is None:
                out.append(f"{name}: not finished")
                continue
            state = "ok" if r.error is None else "FAILED"
            out.append(
                f"{name}: {r.started - self.t0:5.0f}s -> {r.ended - self.t0:5.0f}s "
                f"({r.ended - r.started:.0f}s) {state}"
            )
        return out


_CAMPAIGN: Campaign | None = None


def start_once(root: Path, names: Iterable[str], pairs: Sequence[tuple[str, ...]]) -> Campaign:
    """The process's campaign, started on the first call (later calls get the same one)."""
    global _CAMPAIGN
    if _CAMPAIGN is None:
        _CAMPAIGN = Campaign(root, names, pairs).start()
    return _CAMPAIGN


def current() -> Campaign | None:
    return _CAMPAIGN
