"""A real SLURM cluster for the tests (slurm/dev-cluster/start.sh, once per session), and the
campaign that runs the independent SLURM cases at once (:mod:`_cases`).

The cluster is the project's own one-host dev cluster (munged, slurmctld, slurmd n1..n10 on
loopback). Tests that need it skip only when it cannot be started here: not root, or neither the
SLURM daemons nor apt-get to install them.

The SLURM tier (this directory's tests, and every test marked ``slurm_case`` elsewhere) runs as
one block, at the place of its first test: the campaign of cases starts with the block's first
test, the tests that read no case run while the cases' jobs do, and the tests that read one come
last. Nothing outside the tier shares the machine with the cases' jobs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from _cases import Campaign, current, start_once
from _cluster import Cluster, start, stop, why_not
from _slurm_tools import reference_losses

MARK = "slurm_case"
HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARK}(name): reads the outcome of SLURM case `name` (tests/slurm/_cases.py)"
    )


def _reads_a_case(item: pytest.Item) -> bool:
    return item.get_closest_marker(MARK) is not None


def _in_tier(item: pytest.Item) -> bool:
    return _reads_a_case(item) or Path(str(item.path)).is_relative_to(HERE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = next((i for i, it in enumerate(items) if _in_tier(it)), None)
    if first is None:
        return
    tier = [it for it in items if _in_tier(it)]
    block = [it for it in tier if not _reads_a_case(it)] + [it for it in tier if _reads_a_case(it)]
    items[:] = [
        *[it for it in items[:first]],
        *block,
        *[it for it in items[first:] if not _in_tier(it)],
    ]


def _case_names(items: list[pytest.Item]) -> set[str]:
    names = set()
    for it in items:
        params = getattr(getattr(it, "callspec", None), "params", {})
        for mark in it.iter_markers(MARK):
            names.add(mark.args[0].format(**params))
    return names


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    try:
        cluster = start()
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield cluster
    finally:
        stop()


@pytest.fixture(scope="session")
def campaign(request, slurm_cluster: Cluster, tmp_path_factory) -> Campaign:
    """Every case the selected tests read, started at once (once per session)."""
    found = current()
    if found is not None:
        return found
    names = _case_names(request.session.items)
    return start_once(tmp_path_factory.mktemp("cases"), names, slurm_cluster.isolated_pairs())


@pytest.fixture(scope="session", autouse=True)
def _cases_in_background(request) -> None:
    """The campaign starts with the first test of this directory when any selected test reads a
    case, so that the tests reading none run while the cases' jobs do. A cluster that fails to
    start fails the tests that need it, when they ask for it, not this directory's others."""
    if _case_names(request.session.items) and why_not() is None:
        with contextlib.suppress(Exception, pytest.fail.Exception):
            request.getfixturevalue("campaign")


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[int, float]:
    """Losses of the uninterrupted tiny job (2 ranks, local launcher), by step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return reference_losses(out)


def pytest_terminal_summary(terminalreporter) -> None:
    found = current()
    if found is not None:
        terminalreporter.write_sep("-", "SLURM cases (seconds since the first was started)")
        for line in found.timeline():
            terminalreporter.write_line(line)
