"""The worker side of the torchrun tests: run named scenarios on every rank, report each.

``run_scenarios`` gives each scenario its own directory ``OUT/<name>`` (the same path on every
rank) and writes ``OUT/<name>.ok`` on rank 0 when the scenario held on every rank, or
``OUT/<name>.err.<rank>`` with the traceback; :func:`helpers.torchrun.check_scenario` reads them.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch.distributed as dist

Scenario = Callable[[Path], None]


def run_scenarios(
    scenarios: Mapping[str, Scenario],
    names: Sequence[str],
    out: Path,
    *,
    keep_going: bool = False,
    pg_timeout_s: float = 60.0,
    log_level: int = logging.WARNING,
) -> int:
    """Run ``names`` in order in one gloo process group; returns the process's exit code.

    ``keep_going=False``: the first failure ends this rank at once, without tearing the group
    down (the other ranks may be waiting in a collective for it; torchrun then stops them).
    ``keep_going=True``: every rank catches its own failure and the next scenario still runs
    (its collectives stay matched as long as a failure does not strand a rank in one; the
    process group timeout bounds that case).
    """
    logging.basicConfig(
        level=log_level, format=f"[rank{os.environ.get('RANK')}] %(name)s: %(message)s"
    )
    out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout_s))
    rank = dist.get_rank()
    failed = False
    try:
        for name in names:
            work = out / name
            work.mkdir(parents=True, exist_ok=True)
            ok = True
            try:
                scenarios[name](work)
            except Exception:
                ok = False
                (out / f"{name}.err.{rank}").write_text(traceback.format_exc())
                if not keep_going:
                    os._exit(1)
            failed = failed or not ok
            flags: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(flags, ok)
            if rank == 0 and all(flags):
                (out / f"{name}.ok").touch()
    finally:
        gc.collect()  # FSDP2 + gloo can SIGABRT at exit without this
        dist.destroy_process_group()
    return 1 if failed else 0


def worker_main(namespace: Mapping[str, Any], argv: Sequence[str] | None = None, **kw: Any) -> int:
    """``SCENARIO[,SCENARIO...] OUT`` from the command line, run with :func:`run_scenarios`; a
    scenario ``name`` is the function ``scenario_<name>`` in ``namespace`` (a worker's globals)."""
    names, out = (sys.argv[1:] if argv is None else argv)[:2]
    prefix = "scenario_"
    scenarios = {n[len(prefix) :]: f for n, f in namespace.items() if n.startswith(prefix)}
    return run_scenarios(scenarios, names.split(","), Path(out), **kw)


@contextlib.contextmanager
def unseen_paths(hidden: Callable[[Path], bool]) -> Iterator[None]:
    """``Path.exists`` and ``Path.is_file`` answer False for the paths ``hidden`` picks.

    Stands in for a remote filesystem's attribute cache lagging on one host but not another,
    which cannot be made real with every rank on one machine.
    """
    real_exists, real_is_file = Path.exists, Path.is_file

    def masked(real: Callable[..., bool]) -> Callable[..., bool]:
        def check(self: Path, *a: Any, **k: Any) -> bool:
            return False if hidden(self) else real(self, *a, **k)

        return check

    with (
        patch.object(Path, "exists", masked(real_exists)),
        patch.object(Path, "is_file", masked(real_is_file)),
    ):
        yield


def load_errors(load: Callable[[], object]) -> tuple[str, list[str]]:
    """Call ``load()`` on every rank: this rank's ``FileNotFoundError`` text ("" when it loaded)
    and every rank's, gathered (so a test can see that all ranks raised the same error)."""
    try:
        load()
        raised = ""
    except FileNotFoundError as e:
        raised = str(e)
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, raised)
    return raised, seen
