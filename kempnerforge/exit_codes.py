"""Exit codes shared by the training side and the launchers (no torch: launchers import it).

``RESTART`` (75, sysexits' EX_TEMPFAIL) asks for another run: the job saved and requeued itself,
or a local launcher should start it again. ``REFUSED`` (76): the job stopped for a reason that
should end it for good, because the requeue guard refused another run (no progress, or the
requeue limit). ``HANG`` (77): no step progress past the hang threshold; stacks were dumped and
the guard allowed another run. Anything else non-zero is a crash.
"""

from __future__ import annotations

OK = 0
RESTART = 75
REFUSED = 76
HANG = 77

RESTARTABLE = frozenset({RESTART, HANG})
